"""Replay a RUGD-format (or plain image) folder or a rosbag2 as a camera topic and run the
anomaly detection on it.

  ros2 launch ros_anomaly_diffusion rugd_replay.launch.py \
      data:=/data/rugd checkpoint:=/path/to/checkpoint [rate:=5.0] [loop:=true] [rviz:=true]

Arguments: data (folder or bag, required), rate (frames per second), loop, image_topic, and
those of anomaly_detection.launch.py (variant, namespace, use_sim_time, checkpoint, device,
rviz), passed on to it.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from ros_anomaly_diffusion.ros.transport import large_frame_launch_actions

PACKAGE = 'ros_anomaly_diffusion'


def generate_launch_description():
    share = get_package_share_directory(PACKAGE)
    image_topic = LaunchConfiguration('image_topic')
    replay = Node(
        package=PACKAGE,
        executable='replay_node',
        name='image_replay',
        parameters=[{
            'source': LaunchConfiguration('data'),
            'topic': image_topic,
            'rate_hz': ParameterValue(LaunchConfiguration('rate'), value_type=float),
            'loop': ParameterValue(LaunchConfiguration('loop'), value_type=bool),
            'use_sim_time': ParameterValue(LaunchConfiguration('use_sim_time'), value_type=bool),
        }],
        output='screen',
    )
    detection = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(os.path.join(share, 'launch', 'anomaly_detection.launch.py')),
        launch_arguments={
            'variant': LaunchConfiguration('variant'),
            'namespace': LaunchConfiguration('namespace'),
            'image_topic': image_topic,
            'use_sim_time': LaunchConfiguration('use_sim_time'),
            'checkpoint': LaunchConfiguration('checkpoint'),
            'device': LaunchConfiguration('device'),
            'rviz': LaunchConfiguration('rviz'),
        }.items(),
    )
    return LaunchDescription([
        # camera-sized frames over best effort for everything this launch starts (README)
        *large_frame_launch_actions(os.path.join(share, 'config')),
        DeclareLaunchArgument('data', description='RUGD-format folder, image folder or rosbag2 to replay'),
        DeclareLaunchArgument('rate', default_value='5.0', description='frames per second'),
        DeclareLaunchArgument('loop', default_value='true', description='start again after the last frame'),
        DeclareLaunchArgument('image_topic', default_value='/camera/image', description='camera topic'),
        DeclareLaunchArgument('variant', default_value='',
                              description='detector variant; empty: the one the checkpoint was trained for'),
        DeclareLaunchArgument('namespace', default_value='', description='namespace of the detector'),
        DeclareLaunchArgument('use_sim_time', default_value='false', description='use /clock'),
        DeclareLaunchArgument('checkpoint', default_value='', description='checkpoint folder'),
        DeclareLaunchArgument('device', default_value='', description='torch device; empty: from the parameter file'),
        DeclareLaunchArgument('rviz', default_value='false', description='start rviz2'),
        replay,
        detection,
    ])
