"""ROS-free core: data, networks, samplers, variant families behind one Scorer interface,
the registry, the Detector and the runtime that hosts it."""
