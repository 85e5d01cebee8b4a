//! The channel a `send` request asks for (ARCHITECTURE.md §4b): exactly one
//! of a pre-shared key file, TLS files, or an explicit `insecure`.

use std::sync::Arc;

use super::controller::ControlError;
use super::request::SendRequest;
use crate::transport::{ChannelError, ChannelSecurity, Psk, TlsCredentials, TlsFiles};

/// The channel a `send` asks for: a key file, TLS files (absolute, read
/// by this process) or an explicit `insecure`; never plaintext by default.
pub(super) fn channel_security(req: &SendRequest) -> Result<ChannelSecurity, ControlError> {
    let absolute = |field: &str, path: &std::path::Path| {
        if path.is_absolute() {
            Ok(path.to_path_buf())
        } else {
            Err(ControlError::BadSend(format!(
                "{field} {:?} is not absolute (the VM process's working directory is not yours)",
                path.display().to_string()
            )))
        }
    };
    let tls = [&req.tls_cert, &req.tls_key, &req.tls_ca];
    let tls_given = tls.iter().filter(|f| f.is_some()).count();
    let modes = usize::from(req.psk_file.is_some())
        + usize::from(tls_given > 0)
        + usize::from(req.insecure);
    if modes > 1 {
        return Err(ControlError::BadSend(
            "psk-file, tls-cert/tls-key/tls-ca and insecure exclude each other".into(),
        ));
    }
    if let Some(path) = &req.psk_file {
        let key = Psk::from_file(&absolute("psk-file", path)?).map_err(ControlError::Key)?;
        return Ok(ChannelSecurity::Psk(Arc::new(key)));
    }
    if let [Some(cert), Some(key), Some(ca)] = tls {
        let files = TlsFiles {
            cert: absolute("tls-cert", cert)?,
            key: absolute("tls-key", key)?,
            ca: absolute("tls-ca", ca)?,
        };
        let creds =
            TlsCredentials::load(&files).map_err(|e| ControlError::Key(ChannelError::Tls(e)))?;
        return Ok(ChannelSecurity::Tls(Arc::new(creds)));
    }
    if tls_given > 0 {
        return Err(ControlError::BadSend(
            "TLS needs all of tls-cert, tls-key and tls-ca".into(),
        ));
    }
    if req.insecure {
        return Ok(ChannelSecurity::Insecure);
    }
    Err(ControlError::NoCredential)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::parse_request;
    use crate::api::ApiRequest;

    fn send(json: &str) -> SendRequest {
        match parse_request(json).unwrap() {
            ApiRequest::Send(r) => r,
            other => panic!("{other:?}"),
        }
    }

    fn refusal(json: &str) -> String {
        channel_security(&send(json)).unwrap_err().to_string()
    }

    #[test]
    fn plaintext_only_when_asked_for() {
        let none = channel_security(&send(r#"{"command":"send","to":"unix:/x"}"#)).unwrap_err();
        assert!(matches!(none, ControlError::NoCredential), "{none}");
        let ok = channel_security(&send(
            r#"{"command":"send","to":"unix:/x","insecure":true}"#,
        ));
        assert!(matches!(ok, Ok(ChannelSecurity::Insecure)));
        let both = refusal(r#"{"command":"send","to":"unix:/x","insecure":true,"psk-file":"/k"}"#);
        assert!(both.contains("exclude each other"), "{both}");
        let tls_and_psk = refusal(
            r#"{"command":"send","to":"unix:/x","psk-file":"/k","tls-cert":"/c","tls-key":"/k","tls-ca":"/a"}"#,
        );
        assert!(tls_and_psk.contains("exclude each other"), "{tls_and_psk}");
        let partial = refusal(r#"{"command":"send","to":"unix:/x","tls-cert":"/c"}"#);
        assert!(
            partial.contains("all of tls-cert, tls-key and tls-ca"),
            "{partial}"
        );
        let relative = refusal(r#"{"command":"send","to":"unix:/x","psk-file":"k"}"#);
        assert!(relative.contains("not absolute"), "{relative}");
        let missing = channel_security(&send(
            r#"{"command":"send","to":"unix:/x","psk-file":"/nonexistent/k"}"#,
        ))
        .unwrap_err();
        assert!(
            matches!(&missing, ControlError::Key(ChannelError::KeyFile { .. })),
            "{missing}"
        );
    }
}
