"""The socket guard of the code-evaluation sandbox, for machines without network namespaces.

Run (``runpy.run_path(..., run_name="__main__")``) in the program's interpreter before the
program: afterwards every way to open a socket raises OSError. Standard library only. It is a
best-effort guard against honest mistakes: code that wants the network can undo it.
"""


def guard_sockets() -> None:
    """Best effort without namespaces: every way to open a socket raises OSError."""
    import _socket
    import socket

    def disabled(*args, **kwargs):
        raise OSError("network disabled")

    class DisabledSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise OSError("network disabled")

    for module in (socket, _socket):
        for name in (
            "socketpair",
            "getaddrinfo",
            "gethostbyname",
            "gethostbyname_ex",
            "create_connection",
            "create_server",
            "fromfd",
        ):
            if hasattr(module, name):
                setattr(module, name, disabled)
        module.socket = DisabledSocket


if __name__ == "__main__":
    guard_sockets()
