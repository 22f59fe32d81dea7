//! TLS and mutual TLS of the control plane, with certificates made here: a job runs over TLS,
//! and plaintext, an untrusted CA, or (under mutual TLS) a client without a certificate is
//! refused with a reason.

use std::time::Duration;

use dancegrpo_e2e::{Cluster, TestPki};

fn path(p: &std::path::Path) -> String {
    p.display().to_string()
}

fn refused(out: &std::process::Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(needle), "wanted {needle:?}: {err}");
    // Each cause is said once, though some print their own source too.
    assert_eq!(err.matches(needle).count(), 1, "{needle:?} repeated: {err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_runs_over_tls_and_plaintext_or_an_untrusted_ca_is_refused() {
    let c = Cluster::secured("job_name = \"tls\"\nmax_train_steps = 2\n");
    let pki = TestPki::new(&c.path(""));
    let (cert, key) = (path(&pki.server.0), path(&pki.server.1));
    let (_coord, addr) = c.coordinator(&[
        "--world-size",
        "1",
        "--heartbeat-interval-ms",
        "100",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    let ca = path(&pki.ca);
    let mut w = c.worker(&addr, 0, 0, &["--tls-ca", &ca]);
    let st = w.wait_timeout(Duration::from_secs(180)).expect("the job finishes");
    assert!(st.success(), "{}", c.logs());

    let out = c.cli(&["status", "--addr", &addr, "--json", "--tls-ca", &ca]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((s["state"].as_str(), s["step"].as_u64()), (Some("completed"), Some(2)), "{s}");

    // Plaintext to a TLS port, and a CA that did not sign the coordinator's certificate.
    refused(&c.cli(&["status", "--addr", &addr]), "serving TLS needs --tls-ca");
    let other = path(&pki.other_ca);
    refused(&c.cli(&["status", "--addr", &addr, "--tls-ca", &other]), "UnknownIssuer");
    // The certificate names 127.0.0.1 and localhost; another name is refused, and
    // --tls-domain says which name to expect.
    let by_name = format!("localhost:{}", addr.rsplit(':').next().unwrap());
    let out = c.cli(&["status", "--addr", &by_name, "--tls-ca", &ca]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = c.cli(&["status", "--addr", &addr, "--tls-ca", &ca, "--tls-domain", "example.org"]);
    refused(&out, "certificate not valid for name \"example.org\"");
    let out = c.cli(&["status", "--addr", &addr, "--tls-ca", &ca, "--tls-domain", "localhost"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn under_mutual_tls_a_client_needs_a_certificate_signed_by_the_client_ca() {
    let c = Cluster::secured("job_name = \"mtls\"\n");
    let pki = TestPki::new(&c.path(""));
    let (cert, key, ca) = (path(&pki.server.0), path(&pki.server.1), path(&pki.ca));
    let (_coord, addr) = c.coordinator(&[
        "--world-size",
        "1",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca,
    ]);
    // The server's alert (CertificateRequired) or, when the client wrote first, a broken
    // pipe: refused either way, with the hint.
    refused(
        &c.cli(&["status", "--addr", &addr, "--tls-ca", &ca]),
        "under mutual TLS also --tls-client-cert",
    );
    let (ccert, ckey) = (path(&pki.client.0), path(&pki.client.1));
    let with_cert = [
        "status",
        "--addr",
        &addr,
        "--tls-ca",
        &ca,
        "--tls-client-cert",
        &ccert,
        "--tls-client-key",
        &ckey,
    ];
    let out = c.cli(&with_cert);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("mtls"));
    // A certificate is no token: the token is still required.
    std::fs::remove_file(c.path("token")).unwrap();
    refused(&c.cli(&with_cert), "needs the job's auth token");
    // Half a configuration is a clear error, not a silent plaintext connection.
    let out = c.cli(&["status", "--addr", &addr, "--tls-client-cert", &ccert]);
    refused(&out, "needs --tls-ca");
}
