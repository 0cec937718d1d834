"""The control socket: the JSON-RPC 2.0 server, its method table and the OpenRPC
document, on top of `supervisor.engine`."""
