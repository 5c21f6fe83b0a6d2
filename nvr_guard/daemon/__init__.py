"""The long-running daemon: control socket, command table, status, metrics, systemd notify."""
