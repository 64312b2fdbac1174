//! A small etcd v3 client over the JSON gateway of etcd's gRPC API (`POST /v3/kv/txn`,
//! `/v3/lease/grant`, ...; keys and values base64), which etcd 3.4 serves on its client port.
//!
//! Why not the `etcd-client` crate: it brings tonic, prost and a second HTTP stack into sysd,
//! which is linked statically into every node image, for the six unary calls a reboot lock
//! needs; the gateway is the same API, documented by etcd, and hyper is already here.
//!
//! Endpoints are tried in order until one answers: a node whose own member is down (rebooting,
//! cut off) still reaches the cluster through another.

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};
use url::Url;

/// Connect and answer timeout per endpoint.
const TIMEOUT: Duration = Duration::from_secs(5);
/// No answer this client asks for is bigger.
const ANSWER_MAX: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("etcd endpoint {0:?} is not an http:// URL")]
    BadEndpoint(String),
    #[error("no etcd endpoint answered ({0})")]
    Unreachable(String),
    #[error("etcd {endpoint} refused {call}: {message}")]
    Refused {
        endpoint: String,
        call: &'static str,
        message: String,
    },
    #[error("etcd {endpoint}: unexpected answer to {call}: {why}")]
    Answer {
        endpoint: String,
        call: &'static str,
        why: String,
    },
}

/// One key-value pair as etcd returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

/// The cluster, through any of its client endpoints.
#[derive(Debug, Clone)]
pub struct Client {
    endpoints: Vec<Url>,
}

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn unb64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

/// etcd's JSON gateway writes 64-bit integers as strings (proto3 JSON) and omits zeros.
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// The first key after every key with this prefix (etcd's `range_end` for a prefix scan).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn kvs(v: &Value) -> Vec<Kv> {
    v.get("kvs")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|kv| {
                    let key = unb64(kv.get("key")?.as_str()?)?;
                    Some(Kv {
                        key: String::from_utf8_lossy(&key).into_owned(),
                        value: kv
                            .get("value")
                            .and_then(Value::as_str)
                            .and_then(unb64)
                            .unwrap_or_default(),
                        create_revision: kv.get("create_revision").map(int).unwrap_or(0),
                        mod_revision: kv.get("mod_revision").map(int).unwrap_or(0),
                        lease: kv.get("lease").map(int).unwrap_or(0),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Client {
    /// A client for `endpoints` (`http://host:2379`).
    pub fn new(endpoints: &[String]) -> Result<Client, Error> {
        let mut out = Vec::new();
        for e in endpoints {
            let url = Url::parse(e).map_err(|_| Error::BadEndpoint(e.clone()))?;
            if url.scheme() != "http" || url.host_str().is_none() {
                return Err(Error::BadEndpoint(e.clone()));
            }
            out.push(url);
        }
        if out.is_empty() {
            return Err(Error::BadEndpoint(String::new()));
        }
        Ok(Client { endpoints: out })
    }

    async fn call(&self, call: &'static str, path: &str, body: Value) -> Result<Value, Error> {
        let mut failures = Vec::new();
        for ep in &self.endpoints {
            match post(ep, path, &body).await {
                Ok((status, answer)) if status < 300 => return Ok(answer),
                // A definite refusal (bad request, no such lease): another member would say
                // the same.
                Ok((status, answer)) if status < 500 => {
                    return Err(Error::Refused {
                        endpoint: ep.to_string(),
                        call,
                        message: answer
                            .get("message")
                            .or_else(|| answer.get("error"))
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_owned(),
                    })
                }
                Ok((status, answer)) => failures.push(format!(
                    "{ep}: HTTP {status} {}",
                    answer.get("message").and_then(Value::as_str).unwrap_or("")
                )),
                Err(e) => failures.push(format!("{ep}: {e}")),
            }
        }
        Err(Error::Unreachable(failures.join("; ")))
    }

    /// Grants a lease of `ttl`; returns its ID.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, Error> {
        let a = self
            .call(
                "lease grant",
                "/v3/lease/grant",
                json!({"TTL": ttl.as_secs().max(1)}),
            )
            .await?;
        match a.get("ID").map(int) {
            Some(id) if id != 0 => Ok(id),
            _ => Err(self.answer("lease grant", "no lease ID")),
        }
    }

    /// Renews a lease; `Ok(false)` when it no longer exists (expired or revoked).
    pub async fn keepalive(&self, lease: i64) -> Result<bool, Error> {
        let a = self
            .call(
                "lease keepalive",
                "/v3/lease/keepalive",
                json!({"ID": lease.to_string()}),
            )
            .await?;
        // A stream of one result; an expired lease comes back without a TTL.
        let r = a.get("result").unwrap_or(&a);
        Ok(r.get("TTL").map(int).unwrap_or(0) > 0)
    }

    /// Revokes a lease (deleting every key attached to it). A lease already gone is fine.
    pub async fn revoke(&self, lease: i64) -> Result<(), Error> {
        match self
            .call(
                "lease revoke",
                "/v3/lease/revoke",
                json!({"ID": lease.to_string()}),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(Error::Refused { message, .. }) if message.contains("not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every key under `prefix`, in key order.
    pub async fn range_prefix(&self, prefix: &str) -> Result<Vec<Kv>, Error> {
        let a = self
            .call(
                "range",
                "/v3/kv/range",
                json!({"key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix))}),
            )
            .await?;
        Ok(kvs(&a))
    }

    /// One key.
    pub async fn get(&self, key: &str) -> Result<Option<Kv>, Error> {
        let a = self
            .call("range", "/v3/kv/range", json!({"key": b64(key.as_bytes())}))
            .await?;
        Ok(kvs(&a).into_iter().next())
    }

    /// Writes `key` unconditionally (lease 0: none).
    pub async fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<(), Error> {
        self.call("put", "/v3/kv/put", put(key, value, lease))
            .await?;
        Ok(())
    }

    /// Creates `key` only if it does not exist. `Ok(true)` when this call created it.
    pub async fn create(&self, key: &str, value: &[u8], lease: i64) -> Result<bool, Error> {
        let a = self
            .call(
                "txn",
                "/v3/kv/txn",
                json!({
                    "compare": [{"key": b64(key.as_bytes()), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
                    "success": [{"request_put": put(key, value, lease)}],
                }),
            )
            .await?;
        Ok(a.get("succeeded").and_then(Value::as_bool).unwrap_or(false))
    }

    /// Deletes `key` only if its value is still `value` (so a slot someone else took after our
    /// lease expired is not freed by us). `Ok(true)` when deleted.
    pub async fn delete_if(&self, key: &str, value: &[u8]) -> Result<bool, Error> {
        let a = self
            .call(
                "txn",
                "/v3/kv/txn",
                json!({
                    "compare": [{"key": b64(key.as_bytes()), "target": "VALUE", "result": "EQUAL", "value": b64(value)}],
                    "success": [{"request_delete_range": {"key": b64(key.as_bytes())}}],
                }),
            )
            .await?;
        Ok(a.get("succeeded").and_then(Value::as_bool).unwrap_or(false))
    }

    /// Deletes `key` unconditionally.
    pub async fn delete(&self, key: &str) -> Result<(), Error> {
        self.call(
            "delete",
            "/v3/kv/deleterange",
            json!({"key": b64(key.as_bytes())}),
        )
        .await?;
        Ok(())
    }

    fn answer(&self, call: &'static str, why: &str) -> Error {
        Error::Answer {
            endpoint: self.endpoints[0].to_string(),
            call,
            why: why.to_owned(),
        }
    }
}

fn put(key: &str, value: &[u8], lease: i64) -> Value {
    let mut p = json!({"key": b64(key.as_bytes()), "value": b64(value)});
    if lease != 0 {
        p["lease"] = Value::String(lease.to_string());
    }
    p
}

#[derive(Deserialize)]
struct GatewayError {
    #[serde(default)]
    message: String,
}

async fn post(ep: &Url, path: &str, body: &Value) -> Result<(u16, Value), String> {
    let host = ep.host_str().unwrap_or("").to_owned();
    let port = ep.port_or_known_default().unwrap_or(2379);
    let exchange = async {
        let stream = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::post(path)
            .header(HOST, format!("{host}:{port}"))
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let bytes = Limited::new(resp.into_body(), ANSWER_MAX)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        // The keepalive gateway answers a stream: its first JSON object is the result.
        let text = String::from_utf8_lossy(&bytes);
        let first = serde_json::Deserializer::from_str(&text)
            .into_iter::<Value>()
            .next()
            .transpose()
            .map_err(|e| format!("not JSON: {e}"))?
            .unwrap_or(Value::Null);
        if status >= 300 {
            if let Ok(g) = serde_json::from_value::<GatewayError>(first.clone()) {
                return Ok((status, json!({"message": g.message})));
            }
        }
        Ok((status, first))
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {}s", TIMEOUT.as_secs()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end("a"), b"b".to_vec());
    }

    #[test]
    fn decodes_gateway_kvs() {
        let v = json!({"kvs": [{"key": b64(b"/k"), "value": b64(b"v"), "create_revision": "5", "mod_revision": "7", "lease": "42"}]});
        let k = kvs(&v);
        assert_eq!(k[0].key, "/k");
        assert_eq!(k[0].value, b"v");
        assert_eq!((k[0].create_revision, k[0].mod_revision), (5, 7));
        assert!(kvs(&json!({})).is_empty());
    }

    #[test]
    fn endpoints_must_be_http() {
        assert!(Client::new(&["https://x:2379".into()]).is_err());
        assert!(Client::new(&[]).is_err());
        assert!(Client::new(&["http://10.0.0.1:2379".into()]).is_ok());
    }
}
