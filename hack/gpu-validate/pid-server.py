#!/usr/bin/env python3
"""A stand-in for the node agent's host-pid socket, for GPU checks outside
Kubernetes: listens on the unix socket given as the only argument (mode
0666) and answers each connection with the peer's pid as SO_PEERCRED
reports it in this process's pid namespace (run it in the host's), as 4
bytes little-endian, then closes. Runs until killed."""
import os
import socket
import struct
import sys

path = sys.argv[1]
if os.path.exists(path):
    os.unlink(path)
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
os.chmod(path, 0o666)
server.listen(64)
while True:
    conn, _ = server.accept()
    pid, _uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    conn.sendall(struct.pack("<I", pid))
    conn.close()
