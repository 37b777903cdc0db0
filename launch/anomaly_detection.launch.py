"""Anomaly detection on a camera topic, optionally with RViz.

  ros2 launch ros_anomaly_diffusion anomaly_detection.launch.py \
      checkpoint:=/path/to/checkpoint image_topic:=/camera/image [variant:=ddim] [rviz:=true]

Arguments: variant (loads config/<variant>.yaml), namespace, image_topic (the node's `image`
input is remapped to it), use_sim_time, checkpoint, device (empty: the value in the
variant's parameter file), rviz (true: rviz2 with config/anomaly.rviz, its topics adjusted
to image_topic and namespace).
"""
import os
import tempfile

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
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
    variant = arg('variant')
    params_file = os.path.join(share, 'config', variant + '.yaml')
    if not os.path.isfile(params_file):
        known = sorted(f[:-5] for f in os.listdir(os.path.join(share, 'config')) if f.endswith('.yaml'))
        raise RuntimeError('no parameter file config/%s.yaml for variant %r; variants: %s'
                           % (variant, variant, ', '.join(known)))
    use_sim_time = _truthy(arg('use_sim_time'))
    overrides = {'variant': variant, 'use_sim_time': use_sim_time}
    if arg('checkpoint'):
        overrides['checkpoint'] = arg('checkpoint')
    if arg('device'):
        overrides['device'] = arg('device')
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
        DeclareLaunchArgument('variant', default_value='ddim',
                              description='optimization variant; loads config/<variant>.yaml'),
        DeclareLaunchArgument('namespace', default_value='', description='namespace of the detector'),
        DeclareLaunchArgument('image_topic', default_value='/camera/image',
                              description='camera topic (sensor_msgs/Image) the detector reads'),
        DeclareLaunchArgument('use_sim_time', default_value='false', description='use /clock'),
        DeclareLaunchArgument('checkpoint', default_value='',
                              description='checkpoint folder (config.json + .safetensors)'),
        DeclareLaunchArgument('device', default_value='',
                              description='torch device (cpu, cuda, cuda:N); empty: from the parameter file'),
        DeclareLaunchArgument('rviz', default_value='false',
                              description='start rviz2 with camera, overlay and mask displays'),
        OpaqueFunction(function=_launch_nodes),
    ])
