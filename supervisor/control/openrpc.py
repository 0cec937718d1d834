"""The OpenRPC document ``rpc.discover`` returns, generated from the method table's types."""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from supervisor import __version__
from supervisor.control.methods import METHODS
from supervisor.model import api

REF_TEMPLATE = "#/components/schemas/{name}"

#: Methods the RPC server implements itself (they need the connection).
_CONNECTION_METHODS = (
    ("events.subscribe", api.SubscribeParams, api.SubscribeResult, "Receive event notifications."),
    ("events.unsubscribe", api.UnsubscribeParams, api.Empty, "Stop a subscription."),
)


@functools.cache
def openrpc_document() -> dict[str, Any]:
    """An OpenRPC 1.2 document describing every method, params by name."""
    entries = [(m.name, m.params, m.result, m.summary) for m in METHODS.values()]
    entries += list(_CONNECTION_METHODS)
    types: list[Any] = []
    for _, params, result, _ in entries:
        types += [params, result]
    schemas, components = msgspec.json.schema_components(types, ref_template=REF_TEMPLATE)
    methods = []
    for index, (name, _params, _result, summary) in enumerate(entries):
        params_schema = schemas[2 * index]
        resolved = components.get(_ref_name(params_schema), params_schema)
        required = set(resolved.get("required", []))
        methods.append(
            {
                "name": name,
                "summary": summary,
                "paramStructure": "by-name",
                "params": [
                    {"name": field, "schema": schema, "required": field in required}
                    for field, schema in resolved.get("properties", {}).items()
                ],
                "result": {"name": "result", "schema": schemas[2 * index + 1]},
            }
        )
    return {
        "openrpc": "1.2.6",
        "info": {"title": "kvm-supervisor control socket", "version": __version__},
        "methods": methods,
        "components": {"schemas": components},
    }


def _ref_name(schema: dict[str, Any]) -> str:
    return str(schema.get("$ref", "")).rsplit("/", 1)[-1]
