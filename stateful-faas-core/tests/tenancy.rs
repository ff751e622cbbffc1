//! Tenant isolation on every route (docs/contracts.md, "Tenants, tokens and trust").

use crate::common;

use common::{ADMIN, start};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_never_see_or_touch_each_other() {
    let core = start(|_| {}).await;
    let acme = core.tenant("acme").await;
    let globex = core.tenant("globex").await;
    core.deploy(&acme, json!({"service": "secret", "builtin": "echo"})).await;
    core.deploy(&globex, json!({"service": "mine", "builtin": "echo"})).await;
    let url = |path: &str| format!("{}{path}", core.url);
    let http = &core.http;

    // Listing shows only the caller's namespace; naming another is refused.
    let (status, list) = core.get_json(&globex.read, "/system/functions").await;
    assert_eq!(status, 200);
    let names: Vec<_> = list.as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, vec!["mine"]);
    assert_eq!(core.get_json(&globex.read, "/system/functions?namespace=acme").await.0, 403);
    assert_eq!(core.get_json(&globex.read, "/system/function/secret?namespace=acme").await.0, 403);
    assert_eq!(core.get_json(&globex.read, "/system/function/secret").await.0, 404);
    let (_, namespaces) = core.get_json(&globex.read, "/system/namespaces").await;
    assert_eq!(namespaces, json!(["globex"]));

    // Invoking, async invoking, deploying, updating, scaling and deleting across tenants fail.
    assert_eq!(core.invoke(&globex.ingest, "secret.acme", "x").await.status(), 403);
    assert_eq!(core.invoke(&globex.ingest, "secret", "x").await.status(), 404);
    let r = http.post(url("/async-function/secret.acme")).bearer_auth(&globex.ingest).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .post(url("/system/functions"))
        .bearer_auth(&globex.ingest)
        .json(&json!({"service": "planted", "namespace": "acme", "builtin": "echo"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .put(url("/system/functions"))
        .bearer_auth(&globex.ingest)
        .json(&json!({"service": "secret", "namespace": "acme", "builtin": "fail"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .post(url("/system/scale-function/secret"))
        .bearer_auth(&globex.ingest)
        .json(&json!({"namespace": "acme", "replicas": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .delete(url("/system/functions"))
        .bearer_auth(&globex.ingest)
        .json(&json!({"functionName": "secret", "namespace": "acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(core.get_json(&globex.read, "/system/async-dead-letters?namespace=acme").await.0, 403);
    assert_eq!(core.get_json(&globex.read, "/system/async-calls/x?namespace=acme").await.0, 403);
    // acme's function is untouched.
    assert_eq!(core.invoke(&acme.ingest, "secret", "still mine").await.text().await.unwrap(), "still mine");

    // X-Scope-OrgID must agree with the token.
    let r = http
        .get(url("/system/functions"))
        .bearer_auth(&globex.read)
        .header("X-Scope-OrgID", "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .get(url("/system/functions"))
        .bearer_auth(&globex.read)
        .header("X-Scope-OrgID", "globex")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Read tokens read; they do not run or change anything.
    assert_eq!(core.invoke(&acme.read, "secret", "x").await.status(), 403);
    let r = http
        .post(url("/system/functions"))
        .bearer_auth(&acme.read)
        .json(&json!({"service": "x", "builtin": "echo"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // Tenants cannot create tenants, list them, or read the metrics of all tenants.
    let r = http
        .post(url("/system/tenants"))
        .bearer_auth(&acme.ingest)
        .json(&json!({"name": "evil"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(core.get_json(&acme.read, "/system/tenants").await.0, 403);
    assert_eq!(core.get_json(&acme.read, "/metrics").await.0, 403);

    // No token, a wrong token, or a malformed header: 401 on every protected route.
    for path in ["/system/functions", "/system/namespaces", "/system/info", "/metrics", "/system/tenants"] {
        assert_eq!(http.get(url(path)).send().await.unwrap().status(), 401, "{path} without a token");
        assert_eq!(http.get(url(path)).bearer_auth("wrong").send().await.unwrap().status(), 401, "{path} bad token");
        let r = http.get(url(path)).header("Authorization", "Token abc").send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} malformed header");
    }
    assert_eq!(http.post(url("/function/secret.acme")).send().await.unwrap().status(), 401);
    assert_eq!(http.get(url("/healthz")).send().await.unwrap().status(), 200);

    // The admin sees every namespace and must name one to act.
    let (_, all) = core.get_json(ADMIN, "/system/functions").await;
    assert_eq!(all.as_array().unwrap().len(), 2);
    assert_eq!(core.invoke(ADMIN, "secret", "x").await.status(), 400);
    assert_eq!(core.invoke(ADMIN, "secret.acme", "admin").await.text().await.unwrap(), "admin");
    let (_, namespaces) = core.get_json(ADMIN, "/system/namespaces").await;
    assert_eq!(namespaces, json!(["acme", "globex"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_names_and_duplicates_are_refused() {
    let core = start(|_| {}).await;
    core.tenant("acme").await;
    let create = |name: &str| {
        core.http.post(format!("{}/system/tenants", core.url)).bearer_auth(ADMIN).json(&json!({"name": name})).send()
    };
    assert_eq!(create("acme").await.unwrap().status(), 409);
    let bad = create("Not_A_Namespace").await.unwrap();
    assert_eq!(bad.status(), 400);
    assert!(bad.text().await.unwrap().contains("Not_A_Namespace"));
    // Deploying into a namespace that does not exist is a clear 404.
    let r = core
        .http
        .post(format!("{}/system/functions", core.url))
        .bearer_auth(ADMIN)
        .json(&json!({"service": "x", "namespace": "ghost", "builtin": "echo"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}
