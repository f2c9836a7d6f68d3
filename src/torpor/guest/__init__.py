"""Client for the QEMU guest agent (qemu-ga) over its virtio-serial socket."""

from torpor.guest.agent import AgentError, ExecResult, GuestAgent

__all__ = ["AgentError", "ExecResult", "GuestAgent"]
