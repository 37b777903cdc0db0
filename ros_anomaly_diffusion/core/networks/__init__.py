"""Networks: denoisers (UNet, DiT), autoencoders (DC-AE), the pretrained backbone, and
the one loader of a checkpoint's denoiser (quantization-aware) plus its accelerators."""
