//! Calls from the original fal-serverless client (0.6.41, and isolate clients that pickle with dill).
//!
//! Such a client sends `SerializedObject { method: "dill" }` holding a function of no arguments (its arguments bound
//! into a wrapper), and expects the outcome back the way the original service sent it: the return value pickled with
//! dill, or the exception pickled with dill, `was_it_raised` set and the remote traceback as text, which the client
//! attaches to the exception it raises. A function that could not even be unpickled is an `INVALID_ARGUMENT` whose
//! message says "The function function could not be deserialized": the client recognizes it and tells the user which
//! modules the function uses that its requirements lack.
//!
//! The worker's side of this is the agent's dill mode; the dill itself comes from the engine's dill layer.

use bytes::Bytes;
use fal_proto::SerializedObject;
use serde::Deserialize;
use tonic::Status;

/// The `method` these calls name.
pub(crate) const METHOD: &str = "dill";

/// What the agent's dill mode says of an exception, in the JSON line before the exception's pickle.
#[derive(Debug, Deserialize)]
struct Raised {
    stage: String,
    #[serde(rename = "type")]
    type_name: String,
    message: String,
    traceback: String,
}

/// The `return_value` of a dill call's result, or the status a function that never loaded ends with.
pub(crate) fn return_value(raised: bool, payload: Bytes) -> Result<SerializedObject, Status> {
    if !raised {
        return Ok(SerializedObject {
            method: METHOD.into(),
            definition: payload,
            was_it_raised: false,
            stringized_traceback: None,
        });
    }
    let split = payload.iter().position(|&b| b == b'\n');
    let described = split.and_then(|at| serde_json::from_slice::<Raised>(&payload[..at]).ok().map(|r| (at, r)));
    let Some((at, raised)) = described else {
        return Err(Status::internal("the worker described its exception in a form this server does not know"));
    };
    if raised.stage == "load" {
        return Err(Status::invalid_argument(format!(
            "The function function could not be deserialized on the server: {}: {}. If a module is missing, add \
             its package to requirements=[...].\n{}",
            raised.type_name, raised.message, raised.traceback
        )));
    }
    Ok(SerializedObject {
        method: METHOD.into(),
        definition: payload.slice(at + 1..),
        was_it_raised: true,
        stringized_traceback: Some(raised.traceback),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn described(stage: &str, pickle: &[u8]) -> Bytes {
        let head = serde_json::json!({"stage": stage, "type": "builtins.ValueError", "message": "bad",
            "traceback": "Traceback (most recent call last):\nValueError: bad\n"});
        let mut payload = serde_json::to_vec(&head).unwrap();
        payload.push(b'\n');
        payload.extend_from_slice(pickle);
        payload.into()
    }

    #[test]
    fn a_return_value_goes_back_as_it_came() {
        let value = return_value(false, Bytes::from_static(b"\x80\x04K\x01.")).unwrap();
        assert_eq!(
            (value.method.as_str(), &value.definition[..], value.was_it_raised),
            ("dill", &b"\x80\x04K\x01."[..], false)
        );
    }

    #[test]
    fn a_raised_exception_carries_its_pickle_and_traceback() {
        let value = return_value(true, described("call", b"\x80\x04\n.")).unwrap();
        assert!(value.was_it_raised);
        assert_eq!(&value.definition[..], b"\x80\x04\n.", "a newline inside the pickle is the pickle's");
        assert!(value.stringized_traceback.unwrap().ends_with("ValueError: bad\n"));
    }

    #[test]
    fn a_function_that_never_loaded_is_the_status_the_client_recognizes() {
        let status = return_value(true, described("load", b"")).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("The function function could not be deserialized"));
        assert!(status.message().contains("builtins.ValueError: bad"));
    }

    #[test]
    fn an_undescribed_exception_is_an_internal_error_not_a_panic() {
        for payload in [&b""[..], b"no newline", b"{not json}\n\x80"] {
            let status = return_value(true, Bytes::copy_from_slice(payload)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Internal);
        }
    }
}
