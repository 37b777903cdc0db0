"""Anomaly detection on several cameras with the same model settings.

  ros2 launch ros_anomaly_diffusion multi_camera.launch.py \
      cameras:=/front/image_raw,/rear/image_raw [checkpoint:=/path/to/checkpoint] \
      [variant:=knn] [backend:=auto] [device:=cuda] [use_sim_time:=false] [one_model:=true]

Arguments: cameras (comma-separated sensor_msgs/Image topics), variant (loads
config/<variant>.yaml for every detector; empty: the variant the checkpoint was trained for), checkpoint, device (empty: the value in the
variant's parameter file), use_sim_time, one_model.

one_model:=true (the default): one detector_node (node anomaly_detector, no namespace) serves
every camera with one copy of the model, the newest frame of each camera in one batch
(`cameras` parameter). one_model:=false: one detector_node per camera, as below.

Each camera gets its own detector_node (node name anomaly_detector) in a namespace derived
from its topic: the topic without its last name component, i.e. the camera's own namespace
(/front/image_raw -> front, /robot/rear/image_raw -> robot/rear); a topic with a single
component uses that (/image_raw -> image_raw). The outputs are therefore beside the camera:
/front/anomaly/mask, /rear/anomaly/mask, ..., and each node's `image` input is remapped to
its topic. Relative topics are taken as absolute (a leading / is added). Two cameras that
would share a namespace are refused with a message. Every detector loads its own copy of
the model (on a GPU: one copy per camera in GPU memory).
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from ros_anomaly_diffusion.ros.cameras import camera_namespaces
from ros_anomaly_diffusion.config import checkpoint_variant, variant_params_file
from ros_anomaly_diffusion.ros.transport import large_frame_launch_actions

PACKAGE = 'ros_anomaly_diffusion'


def _truthy(text):
    return text.strip().lower() in ('1', 'true', 'yes', 'on')


def _launch_nodes(context):
    arg = lambda name: LaunchConfiguration(name).perform(context)  # noqa: E731
    variant = arg('variant') or checkpoint_variant(arg('checkpoint'))  # empty: the checkpoint's
    params_file = str(variant_params_file(variant))
    overrides = {'variant': variant, 'use_sim_time': _truthy(arg('use_sim_time'))}
    if arg('checkpoint'):
        overrides['checkpoint'] = arg('checkpoint')
    if arg('device'):
        overrides['device'] = arg('device')
    for key in ('backend', 'precision'):  # empty: from the parameter file
        if arg(key):
            overrides[key] = arg(key)
    pairs = camera_namespaces(arg('cameras'))
    if _truthy(arg('one_model')):
        return [Node(
            package=PACKAGE,
            executable='detector_node',
            name='anomaly_detector',
            parameters=[params_file, dict(overrides, cameras=','.join(topic for topic, _ in pairs))],
            output='screen',
            emulate_tty=True,
        )]
    return [Node(
        package=PACKAGE,
        executable='detector_node',
        name='anomaly_detector',
        namespace=namespace,
        parameters=[params_file, overrides],
        remappings=[('image', topic)],
        output='screen',
        emulate_tty=True,
    ) for topic, namespace in pairs]


def generate_launch_description():
    return LaunchDescription([
        # camera-sized frames over best effort for everything this launch starts (README)
        *large_frame_launch_actions(os.path.join(get_package_share_directory(PACKAGE), 'config')),
        DeclareLaunchArgument('cameras', default_value='/camera/image_raw',
                              description='comma-separated camera topics (sensor_msgs/Image); one detector '
                                          'each, in the camera namespace (/front/image_raw -> /front)'),
        DeclareLaunchArgument('variant', default_value='',
                              description='optimization variant; loads config/<variant>.yaml; empty: the '
                                          'variant the checkpoint was trained for'),
        DeclareLaunchArgument('checkpoint', default_value='',
                              description='checkpoint folder; empty: the model shipped with the package'),
        DeclareLaunchArgument('backend', default_value='',
                              description='where the networks run: auto (ONNX Runtime on a CPU, TensorRT on '
                                          'CUDA with torch-tensorrt, else torch), torch, onnxruntime, openvino, '
                                          'tensorrt; empty: from the parameter file (auto unless it sets one)'),
        DeclareLaunchArgument('precision', default_value='',
                              description='fp32 or bf16 (backend openvino); empty: from the parameter file'),
        DeclareLaunchArgument('device', default_value='',
                              description='torch device (cpu, cuda, cuda:N); empty: from the parameter file'),
        DeclareLaunchArgument('use_sim_time', default_value='false', description='use /clock'),
        DeclareLaunchArgument('one_model', default_value='true',
                              description='true: one detector process and one model for every camera'),
        OpaqueFunction(function=_launch_nodes),
    ])
