"""Client for the QEMU guest agent (qemu-ga) over its virtio-serial socket (agent.py),
and what a command run through it returns (result.py). Import the modules themselves."""
