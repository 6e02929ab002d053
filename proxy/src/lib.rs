//! The OCI registry mirror (docker, containerd, podman pull through the local node). Built in its own issue.
