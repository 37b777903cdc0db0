"""Networks: denoisers (UNet, DiT), autoencoders (TAEF2, DC-AE), the pretrained backbone, and
the one loader of a checkpoint's denoiser (quantization-aware) plus its accelerators."""
