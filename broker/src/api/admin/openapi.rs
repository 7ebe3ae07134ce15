//! The OpenAPI 3.0 document at `/v1/openapi.json`.

use axum::Json;
use serde_json::{Value, json};

pub(super) async fn openapi() -> Json<Value> {
    Json(openapi_document())
}

/// The OpenAPI 3.0 document of this API.
pub fn openapi_document() -> Value {
    let err = json!({ "description": "error", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } });
    let ok = |schema: &str| json!({ "description": "ok", "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } } });
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "secrets-broker admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "HTTPS with client certificates. Roles: viewer < revoker < admin. Every call is audited."
        },
        "paths": {
            "/v1/revocations": {
                "get": { "summary": "List revocation rules in force (viewer)", "responses": { "200": ok("RuleList"), "401": err, "403": err } },
                "post": {
                    "summary": "Create a revocation rule (revoker); affected sidecars remove the secrets within about a second",
                    "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/NewRule" } } } },
                    "responses": { "201": ok("Created"), "400": err, "401": err, "403": err, "404": err }
                }
            },
            "/v1/revocations/{id}": {
                "delete": {
                    "summary": "Lift a revocation rule (revoker)",
                    "parameters": [{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } }],
                    "responses": { "204": { "description": "deleted" }, "401": err, "403": err, "404": err }
                }
            },
            "/v1/leases": {
                "get": {
                    "summary": "Leases still running (viewer)",
                    "parameters": [
                        { "name": "namespace", "in": "query", "schema": { "type": "string" } },
                        { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 10000 } }
                    ],
                    "responses": { "200": ok("LeaseList"), "401": err, "403": err }
                }
            },
            "/v1/audit": {
                "get": {
                    "summary": "Audit records (viewer): after a sequence number, or the last N",
                    "parameters": [
                        { "name": "after", "in": "query", "schema": { "type": "integer" } },
                        { "name": "limit", "in": "query", "schema": { "type": "integer" } },
                        { "name": "tail", "in": "query", "schema": { "type": "integer" } }
                    ],
                    "responses": { "200": ok("AuditList"), "401": err, "403": err }
                }
            },
            "/v1/audit/verify": {
                "get": { "summary": "Check the chain of the audit log, and against the last checkpoint this replica exported (viewer)", "responses": { "200": ok("VerifyReport"), "401": err, "403": err } },
                "post": {
                    "summary": "Check the chain of the audit log and against exported checkpoints (viewer)",
                    "requestBody": { "required": true, "content": { "application/json": { "schema": {
                        "type": "object", "additionalProperties": false,
                        "properties": { "checkpoints": { "type": "array", "maxItems": 200, "items": { "$ref": "#/components/schemas/Checkpoint" } } }
                    } } } },
                    "responses": { "200": ok("VerifyReport"), "400": err, "401": err, "403": err, "413": err }
                }
            },
            "/v1/secrets": {
                "get": { "summary": "Secret names and latest versions, never values (viewer)", "responses": { "200": ok("SecretList"), "401": err, "403": err } }
            },
            "/v1/secrets/{name}": {
                "parameters": [{ "name": "name", "in": "path", "required": true, "schema": { "type": "string" }, "description": "may contain '/'" }],
                "get": { "summary": "Latest version and value (admin)", "responses": { "200": ok("SecretValue"), "401": err, "403": err, "404": err } },
                "put": {
                    "summary": "Store a new version (admin); running sidecars receive it as a rotation",
                    "requestBody": { "required": true, "content": { "application/json": { "schema": { "type": "object", "required": ["value_base64"], "properties": { "value_base64": { "type": "string", "format": "byte" } } } } } },
                    "responses": { "200": ok("SecretVersion"), "400": err, "401": err, "403": err }
                },
                "delete": { "summary": "Delete every version (admin)", "responses": { "200": { "description": "deleted" }, "401": err, "403": err, "404": err } }
            }
        },
        "components": {
            "schemas": {
                "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "string" } } },
                "NewRule": {
                    "type": "object", "required": ["reason"], "additionalProperties": false,
                    "properties": {
                        "cluster": { "type": "string" }, "namespace": { "type": "string" }, "service_account": { "type": "string" },
                        "pod_uid": { "type": "string" }, "lease_id": { "type": "string" }, "secret": { "type": "string" },
                        "reason": { "type": "string" }, "for_seconds": { "type": "integer", "minimum": 1 }
                    }
                },
                "Rule": {
                    "type": "object",
                    "properties": {
                        "id": { "type": "string" }, "cluster": { "type": "string", "nullable": true }, "namespace": { "type": "string", "nullable": true },
                        "service_account": { "type": "string", "nullable": true }, "pod_uid": { "type": "string", "nullable": true },
                        "lease_id": { "type": "string", "nullable": true }, "secret": { "type": "string", "nullable": true },
                        "reason": { "type": "string" }, "created_by": { "type": "string" },
                        "created_at": { "type": "integer" }, "expires_at": { "type": "integer", "nullable": true }
                    }
                },
                "Created": { "type": "object", "properties": { "rule": { "$ref": "#/components/schemas/Rule" }, "leases_ended": { "type": "integer" } } },
                "RuleList": { "type": "object", "properties": { "revocations": { "type": "array", "items": { "$ref": "#/components/schemas/Rule" } } } },
                "Lease": {
                    "type": "object",
                    "properties": {
                        "lease_id": { "type": "string" }, "issuer": { "type": "string" }, "namespace": { "type": "string" },
                        "service_account": { "type": "string" }, "pod_name": { "type": "string", "nullable": true },
                        "pod_uid": { "type": "string", "nullable": true }, "role": { "type": "string" }, "secret": { "type": "string" },
                        "version": { "type": "integer" }, "issued_at": { "type": "integer" }, "expires_at": { "type": "integer" }
                    }
                },
                "LeaseList": { "type": "object", "properties": { "leases": { "type": "array", "items": { "$ref": "#/components/schemas/Lease" } } } },
                "AuditRecord": {
                    "type": "object",
                    "properties": {
                        "seq": { "type": "integer" }, "at_ms": { "type": "integer" }, "actor": { "type": "string" },
                        "action": { "type": "string" }, "result": { "type": "string" }, "detail": { "type": "string" },
                        "prev_hash": { "type": "string" }, "hash": { "type": "string" },
                        "key_id": { "type": "string", "nullable": true }
                    }
                },
                "Checkpoint": {
                    "type": "object", "required": ["kind", "seq", "count", "head", "at_ms", "key_id", "sig"],
                    "properties": {
                        "kind": { "type": "string", "enum": ["audit_checkpoint"] }, "seq": { "type": "integer" }, "count": { "type": "integer" },
                        "head": { "type": "string" }, "at_ms": { "type": "integer" }, "key_id": { "type": "string" },
                        "run": { "type": "string" }, "sig": { "type": "string" }
                    }
                },
                "AuditList": { "type": "object", "properties": { "records": { "type": "array", "items": { "$ref": "#/components/schemas/AuditRecord" } } } },
                "VerifyReport": {
                    "type": "object",
                    "properties": {
                        "ok": { "type": "boolean" }, "records": { "type": "integer" }, "last_seq": { "type": "integer" },
                        "problem": { "type": "string", "nullable": true }, "problem_seq": { "type": "integer", "nullable": true },
                        "first_seq": { "type": "integer" }, "legacy_records": { "type": "integer" }, "keyed": { "type": "boolean" },
                        "checkpoints_checked": { "type": "integer" }, "checkpoint_seq": { "type": "integer", "nullable": true },
                        "notes": { "type": "array", "items": { "type": "string" } }
                    }
                },
                "SecretList": { "type": "object", "properties": { "secrets": { "type": "array", "items": { "$ref": "#/components/schemas/SecretVersion" } } } },
                "SecretVersion": { "type": "object", "properties": { "name": { "type": "string" }, "version": { "type": "integer" } } },
                "SecretValue": { "type": "object", "properties": { "name": { "type": "string" }, "version": { "type": "integer" }, "value_base64": { "type": "string", "format": "byte" } } }
            }
        }
    })
}
