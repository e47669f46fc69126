"""JSON Schemas for the prometheus-operator objects the chart renders, for a structural check.

kubernetes-validate knows only built-in kinds, and prometheus-operator's CRDs cannot be
fetched here, so this is a transcription of the part of monitoring.coreos.com/v1 that the
chart uses (field names, types, required fields and the Duration pattern, as in
prometheus-operator's CRDs). Every object is closed (additionalProperties: false), so a
misspelt or misplaced field fails; fields the chart does not use are absent, so adding one
means adding it here too.
"""

from __future__ import annotations

from typing import Any

# prometheus-operator's monitoringv1.Duration.
DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
    r"(([0-9]+)ms)?)$",
}
LABEL_NAME = {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


def closed(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = required
    return schema


LABEL_SELECTOR = closed(
    {
        "matchLabels": STRING_MAP,
        "matchExpressions": {
            "type": "array",
            "items": closed(
                {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
                ["key", "operator"],
            ),
        },
    }
)
NAMESPACE_SELECTOR = closed(
    {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}
)
RELABEL_CONFIG = closed(
    {
        "sourceLabels": {"type": "array", "items": LABEL_NAME},
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "modulus": {"type": "integer"},
        "replacement": {"type": "string"},
        "action": {
            "enum": [
                "replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod",
                "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
                "lowercase", "Lowercase", "uppercase", "Uppercase", "keepequal", "KeepEqual",
                "dropequal", "DropEqual",
            ]
        },
    }
)  # fmt: skip
ENDPOINT = {
    "port": {"type": "string"},
    "path": {"type": "string"},
    "interval": DURATION,
    "scrapeTimeout": DURATION,
    "honorLabels": {"type": "boolean"},
    "relabelings": {"type": "array", "items": RELABEL_CONFIG},
}
METADATA = {"type": "object", "required": ["name", "namespace"]}


def _object(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return closed(
        {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": METADATA,
            "spec": spec,
        },
        ["apiVersion", "kind", "metadata", "spec"],
    )


SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": _object(
        "ServiceMonitor",
        closed(
            {
                "selector": LABEL_SELECTOR,
                "namespaceSelector": NAMESPACE_SELECTOR,
                "endpoints": {"type": "array", "minItems": 1, "items": closed(ENDPOINT)},
            },
            ["selector", "endpoints"],
        ),
    ),
    "PodMonitor": _object(
        "PodMonitor",
        closed(
            {
                "selector": LABEL_SELECTOR,
                "namespaceSelector": NAMESPACE_SELECTOR,
                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": closed(ENDPOINT)},
            },
            ["selector", "podMetricsEndpoints"],
        ),
    ),
    "PrometheusRule": _object(
        "PrometheusRule",
        closed(
            {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": closed(
                        {
                            "name": {"type": "string", "minLength": 1},
                            "interval": DURATION,
                            "rules": {
                                "type": "array",
                                "items": closed(
                                    {
                                        "alert": {"type": "string", "minLength": 1},
                                        "record": {"type": "string", "minLength": 1},
                                        "expr": {"type": ["string", "integer"]},
                                        "for": DURATION,
                                        "keep_firing_for": DURATION,
                                        "labels": STRING_MAP,
                                        "annotations": STRING_MAP,
                                    },
                                    ["expr"],
                                ),
                            },
                        },
                        ["name", "rules"],
                    ),
                }
            },
            ["groups"],
        ),
    ),
}
