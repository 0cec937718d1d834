"""Protocol clients: QMP, the human monitor, and the JSON-RPC codec of the control socket."""
