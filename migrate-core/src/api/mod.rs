//! The control socket: one JSON object per line each way, in the spirit of
//! QEMU's QMP and Cloud Hypervisor's `--api-socket` (`docs/API.md` has every
//! command with an example exchange).
//!
//! ```text
//! -> {"command":"info"}                     <- {"response":"info", ...VmStatus...}
//! -> {"command":"pause"}                    <- {"response":"ok"}
//! -> {"command":"send","to":"tcp:127.0.0.1:4444","policy":"qemu"}
//! <- {"response":"progress", ...MigrationReport...}     (one per iteration)
//! <- {"response":"done", ...MigrationReport...}
//! -> {"command":"query-migrate"}            <- {"response":"query-migrate", ...}
//! -> {"command":"migrate-cancel"}           <- {"response":"ok"}
//! <- {"response":"error","message":"..."}               (any refusal)
//! ```
//! Unknown commands and unknown fields are refused, not ignored, with an
//! error naming them: a typo in a script must not silently fall back to a
//! default. Commands that steer a migration (`query-migrate`,
//! `migrate-cancel`, `migrate-set-parameters`) come on another connection
//! than the `send`, which blocks until the migration ends.

mod channel;
mod checkpoint;
mod clone;
mod controller;
mod events;
mod request;
mod response;
mod server;

pub use checkpoint::{StandbyEnd, HEARTBEAT_EVERY};
pub use controller::{ControlError, VmController};
pub use events::{Event, EventBus};
pub use request::{
    parse_request, ApiRequest, MemsaveRequest, RequestError, SendRequest, SetParameters, COMMANDS,
};
pub use response::{
    ApiResponse, ExitSummary, MigrationQuery, NoMigration, RunState, StateDigest, VersionInfo,
    VmStatus,
};
pub use server::{ApiError, ApiServer, ProcessEvent};

/// Version of the JSON API, in `version` and `info`: raised when a command,
/// field or answer changes incompatibly (additions keep it; clients should
/// ignore answer fields they do not know, while the server refuses request
/// fields it does not know).
pub const API_VERSION: u32 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_with_defaults_and_refuse_unknown_fields() {
        let r = parse_request(r#"{"command":"send","to":"unix:/x"}"#).unwrap();
        assert_eq!(r, ApiRequest::Send(SendRequest::new("unix:/x")));
        assert!(parse_request(r#"{"command":"status","x":1}"#).is_err());
        assert!(parse_request(r#"{"command":"send","to":"x","downtime":5}"#).is_err());
    }

    #[test]
    fn refusals_name_the_command_and_the_field() {
        let e = parse_request(r#"{"command":"sned","to":"x"}"#).unwrap_err();
        assert!(matches!(&e, RequestError::UnknownCommand { command } if command == "sned"));
        assert!(e.to_string().contains("\"sned\""), "{e}");
        assert!(
            e.to_string().contains("migrate-cancel"),
            "lists the known: {e}"
        );

        let e = parse_request(r#"{"command":"send","to":"x","downtime":5}"#).unwrap_err();
        let text = e.to_string();
        assert!(matches!(&e, RequestError::BadArguments { command, .. } if command == "send"));
        assert!(
            text.contains("\"send\"") && text.contains("`downtime`"),
            "{text}"
        );

        let e = parse_request(r#"{"command":"pause","force":true}"#).unwrap_err();
        assert!(e.to_string().contains("`force`"), "{e}");
        let e = parse_request(r#"{"command":"memsave","addr":0,"size":1}"#).unwrap_err();
        assert!(
            e.to_string().contains("`file`"),
            "a missing field is named: {e}"
        );
        let e = parse_request(r#"{"command":"memsave","addr":"0x10","size":1,"file":"/f"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("memsave"), "{e}");

        assert!(matches!(
            parse_request(r#"{"verb":"status"}"#),
            Err(RequestError::NoCommand)
        ));
        assert!(matches!(
            parse_request("[1]"),
            Err(RequestError::NotAnObject { .. })
        ));
        assert!(matches!(
            parse_request("status"),
            Err(RequestError::NotAnObject { .. })
        ));
    }

    #[test]
    fn every_listed_command_parses_and_qmp_aliases_map() {
        let args = |c: &str| match c {
            "memsave" | "pmemsave" => r#","addr":0,"size":4096,"file":"/tmp/m""#,
            "send" | "clone" => r#","to":"tcp:127.0.0.1:1""#,
            "migrate-set-parameters" | "set-parameters" => r#","downtime-limit":500"#,
            _ => "",
        };
        for c in COMMANDS {
            let line = format!(r#"{{"command":"{c}"{}}}"#, args(c));
            assert!(
                parse_request(&line).is_ok(),
                "{line}: {:?}",
                parse_request(&line)
            );
        }
        assert_eq!(
            parse_request(r#"{"command":"stop"}"#).unwrap(),
            ApiRequest::Pause {}
        );
        assert_eq!(
            parse_request(r#"{"command":"cont"}"#).unwrap(),
            ApiRequest::Resume { force: false }
        );
        assert_eq!(
            parse_request(r#"{"command":"cancel"}"#).unwrap(),
            ApiRequest::MigrateCancel {}
        );
        assert_eq!(
            parse_request(r#"{"command":"pmemsave","val":4096,"size":8,"filename":"/f"}"#).unwrap(),
            ApiRequest::Memsave(MemsaveRequest {
                addr: 4096,
                size: 8,
                file: "/f".into()
            })
        );
        assert_eq!(
            parse_request(r#"{"command":"set-parameters","max-bandwidth":0}"#).unwrap(),
            ApiRequest::MigrateSetParameters(SetParameters {
                downtime_limit: None,
                max_bandwidth: Some(0)
            })
        );
    }

    #[test]
    fn clone_takes_the_send_fields_and_epoch_ms() {
        let r = parse_request(r#"{"command":"clone","to":"unix:/x","policy":"xen","epoch-ms":25}"#)
            .unwrap();
        let ApiRequest::Clone(c) = r else {
            panic!("{r:?}")
        };
        assert_eq!(c.policy, "xen");
        assert_eq!(c.epoch_ms, Some(25));
        assert_eq!(
            parse_request(r#"{"command":"digest"}"#).unwrap(),
            ApiRequest::Digest {}
        );
        let e = parse_request(r#"{"command":"digest","memory":true}"#).unwrap_err();
        assert!(e.to_string().contains("`memory`"), "{e}");
    }

    #[test]
    fn send_takes_a_downtime_ramp_and_refuses_unknown_ramp_fields() {
        let r = parse_request(
            r#"{"command":"send","to":"unix:/x","downtime-ramp":{"start-ms":150,"end-ms":1050,"steps":10}}"#,
        )
        .unwrap();
        let ApiRequest::Send(s) = r else {
            panic!("{r:?}")
        };
        assert_eq!(
            s.downtime_ramp,
            Some(crate::engine::DowntimeRamp {
                start_ms: 150,
                end_ms: 1050,
                steps: 10
            })
        );
        let e = parse_request(
            r#"{"command":"send","to":"unix:/x","downtime-ramp":{"start-ms":1,"end-ms":2,"step":1}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("`step`"), "{e}");
    }

    #[test]
    fn responses_round_trip() {
        let r = ApiResponse::Error {
            message: "no".into(),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"response":"error","message":"no"}"#);
        assert_eq!(serde_json::from_str::<ApiResponse>(&s).unwrap(), r);

        let none = ApiResponse::QueryMigrate(MigrationQuery::None {
            status: NoMigration::None,
        });
        let s = serde_json::to_string(&none).unwrap();
        assert_eq!(s, r#"{"response":"query-migrate","status":"none"}"#);
        assert_eq!(serde_json::from_str::<ApiResponse>(&s).unwrap(), none);

        let report = crate::engine::MigrationReport::new("qemu", "tcp:h:1", "none", 1 << 20);
        let some = ApiResponse::QueryMigrate(MigrationQuery::Report(Box::new(report)));
        let s = serde_json::to_string(&some).unwrap();
        assert!(
            s.starts_with(r#"{"response":"query-migrate","status":"setup""#),
            "{s}"
        );
        assert_eq!(serde_json::from_str::<ApiResponse>(&s).unwrap(), some);

        let ev = ApiResponse::Event(Event::StateChanged {
            timestamp: 1.5,
            from: RunState::Running,
            to: RunState::Paused,
        });
        let s = serde_json::to_string(&ev).unwrap();
        assert_eq!(
            s,
            r#"{"response":"event","event":"state-changed","timestamp":1.5,"from":"running","to":"paused"}"#
        );
        assert_eq!(serde_json::from_str::<ApiResponse>(&s).unwrap(), ev);
        let p = ApiResponse::Event(Event::MigrationProgress {
            timestamp: 2.0,
            iteration: Some(3),
            remaining: 4096,
            transferred: 8192,
            downtime_limit: Some(300.0),
        });
        let s = serde_json::to_string(&p).unwrap();
        assert!(s.contains(r#""downtime-limit":300.0"#), "{s}");
        assert_eq!(serde_json::from_str::<ApiResponse>(&s).unwrap(), p);
    }
}
