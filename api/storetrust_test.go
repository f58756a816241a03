package api_test

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"strings"
	"testing"

	"github.com/kmsd-project/kmsd/api/client"
)

// TestEtcdWriteAccessIsNotAdmin is the review's reproduction through
// kmsd's HTTPS API on a real etcd. A token record written straight into
// etcd (role admin, the hash of a chosen secret) let its bearer create a
// key and mint an admin token; a disabled version put back to its earlier
// value was enabled again. Now the forged token's request is answered 500
// store-tampered and its audit record names the record; the put-back is
// found by the scrub, after which no request acts on the store.
func TestEtcdWriteAccessIsNotAdmin(t *testing.T) {
	e := newEnvOn(t, "etcd", nil, nil, nil)
	ctx := context.Background()
	admin := e.client(e.admin)
	if _, err := admin.CreateKey(ctx, client.CreateKeyRequest{Name: "k", Kind: "ml-dsa-65"}); err != nil {
		t.Fatal(err)
	}

	// A forged admin token.
	secret := "chosen-by-whoever-writes-etcd"
	h := sha256.Sum256([]byte(secret))
	forged, _ := json.Marshal(map[string]any{"id": "00000000000000f0", "role": "admin", "keys": []string{"*"}, "hash": h[:], "created_at": "2026-01-01T00:00:00Z"})
	if _, err := e.etcdCli.Put(ctx, "/api-test/t/00000000000000f0", string(forged)); err != nil {
		t.Fatal(err)
	}
	bearer := "kms_00000000000000f0_" + secret
	st, _, body := e.raw("POST", "/v1/keys", bearer, "application/json", `{"name":"evil","kind":"ml-dsa-65"}`)
	if st != 500 || !strings.Contains(string(body), "urn:kmsd:problem:store-tampered") {
		t.Fatalf("request with a forged token: %d %s", st, body)
	}
	st, _, body = e.raw("POST", "/v1/tokens", bearer, "application/json", `{"role":"admin"}`)
	if st != 500 || strings.Contains(string(body), "kms_") {
		t.Fatalf("token minted with a forged token: %d %s", st, body)
	}
	if _, err := admin.GetKey(ctx, "evil"); err == nil {
		t.Fatal("the forged token created a key")
	}
	found := 0
	for _, line := range e.auditLog() {
		var r struct {
			Status   int    `json:"status"`
			Problem  string `json:"problem"`
			Tampered string `json:"tampered"`
		}
		json.Unmarshal(line, &r)
		if r.Status == 500 && r.Problem == "store-tampered" && r.Tampered == "t/00000000000000f0" {
			found++
		}
	}
	if found != 2 {
		t.Fatalf("%d audit records name the forged token record, want 2", found)
	}
	if st, _, _ := e.raw("GET", "/readyz", "", "", ""); st != 200 {
		t.Fatalf("readyz after a refused record: %d (one record is refused, the store is whole)", st)
	}

	// A disabled version put back to enabled.
	r, err := e.etcdCli.Get(ctx, "/api-test/v/k/0000000000000001")
	if err != nil || len(r.Kvs) != 1 {
		t.Fatal(err)
	}
	enabled := r.Kvs[0].Value
	if _, err := admin.Rotate(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	st, _, body = e.raw("POST", "/v1/keys/k/versions/1/disable", e.admin, "", "")
	if st != 200 {
		t.Fatalf("disable: %d %s", st, body)
	}
	if _, err := e.etcdCli.Put(ctx, "/api-test/v/k/0000000000000001", string(enabled)); err != nil {
		t.Fatal(err)
	}
	if _, err := e.etcd.Scrub(ctx); err == nil {
		t.Fatal("the scrub passed a version put back")
	}
	st, _, body = e.raw("GET", "/v1/keys/k/versions/1/public-key", e.admin, "", "")
	if st != 500 || !strings.Contains(string(body), "store-tampered") || strings.Contains(string(body), "enabled") {
		t.Fatalf("the version put back: %d %s", st, body)
	}
	if st, _, body := e.raw("GET", "/readyz", "", "", ""); st != 500 || !strings.Contains(string(body), "store-tampered") {
		t.Fatalf("readyz of a broken store: %d %s", st, body)
	}
}
