"""Anomaly detection on a camera topic, optionally with RViz.

  ros2 launch ros_anomaly_diffusion anomaly_detection.launch.py image_topic:=/camera/image_raw \
      [checkpoint:=/path/to/checkpoint variant:=knn|inversion|ddim|...] [rviz:=true]

Without checkpoint the detector runs the model shipped with the package (knn on the RUGD
sample, ros_anomaly_diffusion/models/default/MODEL_CARD.md).

Arguments: variant (loads config/<variant>.yaml; empty, the default: the variant the
checkpoint was trained for), namespace, image_topic (the node's `image` input is remapped to
it), use_sim_time, checkpoint, device (empty: the value in the variant's parameter file),
backend (empty: the parameter file's, auto unless it sets one: ONNX Runtime on a CPU, TensorRT
on CUDA with torch-tensorrt, else torch), precision, rviz (true: rviz2 with config/anomaly.rviz,
its topics adjusted to image_topic and namespace).

For the navigation stack (anomaly/points, README "Wiring it into Nav2"): camera_info_topic
(empty: camera_info beside image_topic), depth_topic (empty: ground-plane projection),
target_frame (default base_link), lifecycle_manager (true: the detector waits unconfigured
and a nav2_lifecycle_manager started here configures and activates it; false: it starts
itself, autostart). To let your Nav2 bringup's own lifecycle manager drive it instead, pass
lifecycle_manager:=false autostart:=false and add the detector's node name to that manager's
node_names.
"""
import os
import tempfile

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from ros_anomaly_diffusion.config import checkpoint_variant, variant_params_file
from ros_anomaly_diffusion.ros.transport import large_frame_launch_actions

PACKAGE = 'ros_anomaly_diffusion'


def _truthy(text):
    return text.strip().lower() in ('1', 'true', 'yes', 'on')


def _rviz_config(share, image_topic, namespace):
    """config/anomaly.rviz with the camera and anomaly topics of this launch."""
    with open(os.path.join(share, 'config', 'anomaly.rviz')) as f:
        text = f.read()
    prefix = '/' + namespace.strip('/') if namespace.strip('/') else ''
    text = text.replace('Value: /anomaly/', 'Value: ' + prefix + '/anomaly/')
    text = text.replace('Value: /camera/image', 'Value: ' + image_topic)
    fd, path = tempfile.mkstemp(prefix='anomaly_', suffix='.rviz')
    with os.fdopen(fd, 'w') as f:
        f.write(text)
    return path


def _launch_nodes(context):
    share = get_package_share_directory(PACKAGE)
    arg = lambda name: LaunchConfiguration(name).perform(context)  # noqa: E731
    variant = arg('variant') or checkpoint_variant(arg('checkpoint'))  # empty: the checkpoint's
    params_file = str(variant_params_file(variant))
    use_sim_time = _truthy(arg('use_sim_time'))
    overrides = {'variant': variant, 'use_sim_time': use_sim_time}
    if arg('checkpoint'):
        overrides['checkpoint'] = arg('checkpoint')
    if arg('device'):
        overrides['device'] = arg('device')
    for key in ('backend', 'precision'):  # empty: from the parameter file
        if arg(key):
            overrides[key] = arg(key)
    managed = _truthy(arg('lifecycle_manager'))
    overrides['autostart'] = _truthy(arg('autostart')) and not managed
    overrides['target_frame'] = arg('target_frame')
    overrides['camera_info_topic'] = arg('camera_info_topic')
    overrides['depth_topic'] = arg('depth_topic')
    namespace = arg('namespace')
    image_topic = arg('image_topic')
    actions = [Node(
        package=PACKAGE,
        executable='detector_node',
        name='anomaly_detector',
        namespace=namespace,
        parameters=[params_file, overrides],
        remappings=[('image', image_topic)],
        output='screen',
        emulate_tty=True,
    )]
    if managed:
        # Nav2's manager; bond_timeout 0: this Python node does not run a bond (bondcpp) heartbeat
        actions.append(Node(
            package='nav2_lifecycle_manager',
            executable='lifecycle_manager',
            name='anomaly_lifecycle_manager',
            namespace=namespace,
            parameters=[{'node_names': ['anomaly_detector'], 'autostart': True, 'bond_timeout': 0.0,
                         'use_sim_time': use_sim_time}],
            output='screen',
        ))
    if _truthy(arg('rviz')):
        actions.append(Node(
            package='rviz2',
            executable='rviz2',
            name='anomaly_rviz',
            arguments=['-d', _rviz_config(share, image_topic, namespace)],
            parameters=[{'use_sim_time': use_sim_time}],
            output='screen',
        ))
    return actions


def generate_launch_description():
    return LaunchDescription([
        # camera-sized frames over best effort for everything this launch starts (README)
        *large_frame_launch_actions(os.path.join(get_package_share_directory(PACKAGE), 'config')),
        DeclareLaunchArgument('variant', default_value='',
                              description='optimization variant; loads config/<variant>.yaml; empty: the '
                                          'variant the checkpoint was trained for'),
        DeclareLaunchArgument('namespace', default_value='', description='namespace of the detector'),
        DeclareLaunchArgument('image_topic', default_value='/camera/image',
                              description='camera topic (sensor_msgs/Image) the detector reads'),
        DeclareLaunchArgument('use_sim_time', default_value='false', description='use /clock'),
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
        DeclareLaunchArgument('rviz', default_value='false',
                              description='start rviz2 with camera, overlay and mask displays'),
        DeclareLaunchArgument('camera_info_topic', default_value='',
                              description='sensor_msgs/CameraInfo for anomaly/points; empty: beside image_topic'),
        DeclareLaunchArgument('depth_topic', default_value='',
                              description='aligned depth image for anomaly/points; empty: ground-plane projection'),
        DeclareLaunchArgument('target_frame', default_value='base_link', description='frame of anomaly/points'),
        DeclareLaunchArgument('autostart', default_value='true',
                              description='the detector configures and activates itself at start-up'),
        DeclareLaunchArgument('lifecycle_manager', default_value='false',
                              description='start a nav2_lifecycle_manager that drives the detector'),
        OpaqueFunction(function=_launch_nodes),
    ])
