//! Fault injection for tests: named points where a test can make this
//! process die on the spot, to reach moments an outside `SIGKILL` cannot hit
//! reliably (between two messages of the completion exchange).
//!
//! Built on the `fail` crate: a point fires only when the `FAILPOINTS`
//! environment variable names it, e.g. `FAILPOINTS=dest-after-accepted=return`
//! (or `2*off->return` for the third time it is reached); otherwise it costs
//! one registry lookup. Firing exits the process at once with
//! [`CRASH_EXIT_CODE`], running no destructor and flushing nothing, so peers
//! see what they would see after a `SIGKILL`: the kernel closing the socket.
//!
//! | point | where |
//! |---|---|
//! | `dest-after-accepted` | destination, `Accepted` flushed, before reading `Commit` |
//! | `dest-after-resume` | destination, guest resumed, before sending `Resumed` |
//! | `source-after-commit` | source, `Commit` flushed, before reading `Resumed` |

/// Exit status of a process killed by a fault point.
pub const CRASH_EXIT_CODE: i32 = 86;

/// Read `FAILPOINTS` from the environment; keep the guard for the life of
/// the process (`vmigrate`'s `main` does).
pub fn setup_from_env() -> fail::FailScenario<'static> {
    fail::FailScenario::setup()
}

/// Die here if `FAILPOINTS` names `name`.
pub fn crash_point(name: &str) {
    fail::fail_point!(name, die);
}

fn die(_: Option<String>) {
    std::process::exit(CRASH_EXIT_CODE)
}
