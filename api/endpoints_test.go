package api_test

import (
	"bytes"
	"context"
	"crypto/mlkem"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/kms"
)

var ctx = context.Background()

// TestSignatureLifecycle: API signatures verify under the served public key
// with an independent verifier (circl, outside the service); after rotation
// old signatures verify by version and new ones use the new version; a
// disabled or destroyed version refuses with a clear error.
func TestSignatureLifecycle(t *testing.T) {
	e := newEnv(t)
	c := e.client(e.admin)
	if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: "docs", Kind: "ml-dsa-65"}); err != nil {
		t.Fatal(err)
	}
	msg, sctx := []byte("release v1.2.3"), []byte("kmsd-test")
	s1, err := c.Sign(ctx, "docs", msg, sctx)
	if err != nil || s1.Version != 1 {
		t.Fatalf("sign: %+v %v", s1, err)
	}
	pub1, err := c.PublicKey(ctx, "docs", 1)
	if err != nil {
		t.Fatal(err)
	}
	indep := func(pub, sig []byte) bool {
		var pk mldsa65.PublicKey
		if err := pk.UnmarshalBinary(pub); err != nil {
			t.Fatal(err)
		}
		return mldsa65.Verify(&pk, msg, sctx, sig)
	}
	if !indep(pub1.PublicKey, s1.Signature) {
		t.Fatal("an independent verifier rejects the API's signature")
	}
	v2, err := c.Rotate(ctx, "docs")
	if err != nil || v2.Version != 2 || !v2.Primary {
		t.Fatalf("rotate: %+v %v", v2, err)
	}
	s2, _ := c.Sign(ctx, "docs", msg, sctx)
	if s2.Version != 2 {
		t.Fatalf("signed with version %d after rotation", s2.Version)
	}
	pub2, _ := c.PublicKey(ctx, "docs", 0)
	if pub2.Version != 2 || !indep(pub2.PublicKey, s2.Signature) || indep(pub2.PublicKey, s1.Signature) {
		t.Fatal("the primary public key does not match the new signature")
	}
	if ok, err := c.Verify(ctx, "docs", 1, msg, s1.Signature, sctx); !ok || err != nil {
		t.Fatalf("old signature by version 1: %v %v", ok, err)
	}
	if ok, _ := c.Verify(ctx, "docs", 2, msg, s1.Signature, sctx); ok {
		t.Fatal("a version 1 signature verified as version 2")
	}
	if ok, _ := c.Verify(ctx, "docs", 1, msg, s1.Signature, []byte("other")); ok {
		t.Fatal("a signature verified under another context")
	}
	// Disabled: refuses to verify or serve its public key.
	if v, err := c.VersionAction(ctx, "docs", 1, "disable", 0); err != nil || v.State != "disabled" {
		t.Fatalf("disable: %+v %v", v, err)
	}
	_, err = c.Verify(ctx, "docs", 1, msg, s1.Signature, sctx)
	if !client.IsProblem(err, "failed-precondition") || !strings.Contains(err.Error(), "disabled") {
		t.Fatalf("verify with a disabled version: %v", err)
	}
	if _, err := c.VersionAction(ctx, "docs", 2, "disable", 0); !client.IsProblem(err, "failed-precondition") || !strings.Contains(err.Error(), "primary") {
		t.Fatalf("disable the primary: %v", err)
	}
	// Destroyed: schedule, let the clock pass, run the destroyer.
	if v, err := c.VersionAction(ctx, "docs", 1, "schedule-destroy", 2); err != nil || v.State != "destroy_scheduled" || v.DestroyAt == nil {
		t.Fatalf("schedule-destroy: %+v %v", v, err)
	}
	e.clock.Add(48 * time.Hour)
	if n, err := e.svc.DestroyDue(ctx); n != 1 || err != nil {
		t.Fatalf("DestroyDue = %d, %v", n, err)
	}
	_, err = c.Verify(ctx, "docs", 1, msg, s1.Signature, sctx)
	if !client.IsProblem(err, "failed-precondition") || !strings.Contains(err.Error(), "destroyed") {
		t.Fatalf("verify with a destroyed version: %v", err)
	}
	k, _ := c.GetKey(ctx, "docs")
	if len(k.Versions) != 2 || k.Versions[1].Version != 1 || k.Versions[1].State != "destroyed" || k.Versions[1].DestroyedAt == nil || k.PrimaryVersion != 2 {
		t.Fatalf("key after destroy: %+v", k)
	}
}

// TestDecapsulateInteropStdlib: Go's crypto/mlkem encapsulates to the served
// public key and /decapsulate returns the same shared secret.
func TestDecapsulateInteropStdlib(t *testing.T) {
	e := newEnv(t)
	c := e.client(e.admin)
	for _, kind := range []string{"ml-kem-768", "ml-kem-1024"} {
		name := "kem-" + kind
		if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: name, Kind: kind}); err != nil {
			t.Fatal(err)
		}
		pub, err := c.PublicKey(ctx, name, 0)
		if err != nil {
			t.Fatal(err)
		}
		var ss, ct []byte
		if kind == "ml-kem-768" {
			ek, err := mlkem.NewEncapsulationKey768(pub.PublicKey)
			if err != nil {
				t.Fatal(err)
			}
			ss, ct = ek.Encapsulate()
		} else {
			ek, err := mlkem.NewEncapsulationKey1024(pub.PublicKey)
			if err != nil {
				t.Fatal(err)
			}
			ss, ct = ek.Encapsulate()
		}
		got, err := c.Decapsulate(ctx, name, pub.Version, ct)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got.SharedSecret, ss) || got.Version != 1 {
			t.Fatalf("%s: shared secrets differ", kind)
		}
		if strings.Contains(e.log.String(), base64.StdEncoding.EncodeToString(ss)) {
			t.Fatal("the shared secret reached the log")
		}
	}
}

// TestAccess: 401 without a valid token, 403 for the wrong role or key.
func TestAccess(t *testing.T) {
	e := newEnv(t)
	admin := e.client(e.admin)
	admin.CreateKey(ctx, client.CreateKeyRequest{Name: "team-a-sig", Kind: "ml-dsa-44"})
	admin.CreateKey(ctx, client.CreateKeyRequest{Name: "team-b-sig", Kind: "ml-dsa-44"})
	tok, err := admin.CreateToken(ctx, client.CreateTokenRequest{Name: "worker a", Role: "worker", Keys: []string{"team-a-*"}})
	if err != nil || !strings.HasPrefix(tok.Token, "kms_") {
		t.Fatalf("create token: %+v %v", tok, err)
	}
	w := e.client(tok.Token)
	if _, err := w.PublicKey(ctx, "team-a-sig", 0); err != nil {
		t.Fatalf("worker reads a public key: %v", err)
	}
	if _, err := w.GetKey(ctx, "team-a-sig"); err != nil {
		t.Fatalf("worker reads a key: %v", err)
	}
	list, err := w.ListKeys(ctx, 0, "")
	if err != nil || len(list.Keys) != 1 || list.Keys[0].Name != "team-a-sig" {
		t.Fatalf("worker's list: %+v %v", list, err)
	}
	before := e.snapshot()
	for name, call := range map[string]func() error{
		"sign":   func() error { _, err := w.Sign(ctx, "team-a-sig", []byte("m"), nil); return err },
		"rotate": func() error { _, err := w.Rotate(ctx, "team-a-sig"); return err },
		"create": func() error {
			_, err := w.CreateKey(ctx, client.CreateKeyRequest{Name: "team-a-new", Kind: "ml-dsa-44"})
			return err
		},
		"token": func() error {
			_, err := w.CreateToken(ctx, client.CreateTokenRequest{Role: "admin", Keys: []string{"*"}})
			return err
		},
		"other key": func() error { _, err := w.PublicKey(ctx, "team-b-sig", 0); return err },
		"disable":   func() error { _, err := w.VersionAction(ctx, "team-a-sig", 1, "disable", 0); return err },
		"patch policy": func() error {
			_, err := w.UpdateKey(ctx, "team-a-sig", client.UpdateKeyRequest{Policy: &client.Policy{}})
			return err
		},
	} {
		if err := call(); client.StatusOf(err) != http.StatusForbidden {
			t.Errorf("worker %s: %v, want 403", name, err)
		}
	}
	for _, bad := range []string{"", "kms_0000000000000000_nope", tok.Token + "x", "not-a-token"} {
		if _, err := e.client(bad).GetKey(ctx, "team-a-sig"); client.StatusOf(err) != http.StatusUnauthorized {
			t.Errorf("token %q: %v, want 401", bad, err)
		}
	}
	if e.snapshot() != before {
		t.Fatal("refused requests changed state")
	}
	if strings.Contains(e.log.String(), tok.Token) || strings.Contains(e.log.String(), e.admin) {
		t.Fatal("a bearer token reached the log")
	}
	// Public endpoints need no token.
	if st, _, _ := e.raw("GET", "/healthz", "", "", ""); st != 200 {
		t.Fatalf("healthz: %d", st)
	}
	if st, _, _ := e.raw("GET", "/readyz", "", "", ""); st != 200 {
		t.Fatalf("readyz: %d", st)
	}
	id, err := e.client("").Identity(ctx)
	if err != nil || id.Algorithm != "ml-dsa-65" || len(id.PublicKey) != mldsa65.PublicKeySize {
		t.Fatalf("identity: %+v %v", id, err)
	}
}

// TestBadInputs: each bad request gets its 4xx problem and changes nothing.
func TestBadInputs(t *testing.T) {
	e := newEnv(t)
	c := e.client(e.admin)
	c.CreateKey(ctx, client.CreateKeyRequest{Name: "sig", Kind: "ml-dsa-65"})
	c.CreateKey(ctx, client.CreateKeyRequest{Name: "kem", Kind: "ml-kem-768"})
	c.Rotate(ctx, "sig")
	c.VersionAction(ctx, "sig", 1, "disable", 0)
	big := `{"message":"` + strings.Repeat("A", 1<<20) + `"}`
	json := "application/json"
	cases := []struct {
		name, method, path, ctype, body string
		status                          int
		typ                             string
	}{
		{"bad name", "POST", "/v1/keys", json, `{"name":"Bad Name","kind":"ml-dsa-65"}`, 400, "invalid-request"},
		{"name too long", "POST", "/v1/keys", json, `{"name":"` + strings.Repeat("a", 65) + `","kind":"ml-dsa-65"}`, 400, "invalid-request"},
		{"reserved name", "POST", "/v1/keys", json, `{"name":"_identity","kind":"ml-dsa-65"}`, 400, "invalid-request"},
		{"unknown kind", "POST", "/v1/keys", json, `{"name":"k","kind":"rsa-2048"}`, 400, "invalid-request"},
		{"missing kind", "POST", "/v1/keys", json, `{"name":"k"}`, 400, "invalid-request"},
		{"existing name", "POST", "/v1/keys", json, `{"name":"sig","kind":"ml-dsa-65"}`, 409, "already-exists"},
		{"unknown field", "POST", "/v1/keys", json, `{"name":"k","kind":"ml-dsa-65","exportable":true}`, 400, "invalid-request"},
		{"mis-cased field", "POST", "/v1/keys", json, `{"Name":"k","kind":"ml-dsa-65"}`, 400, "invalid-request"},
		{"duplicate field", "POST", "/v1/keys", json, `{"name":"k","name":"k2","kind":"ml-dsa-65"}`, 400, "invalid-request"},
		{"nested duplicate", "POST", "/v1/keys", json, `{"name":"k","kind":"ml-dsa-65","policy":{"destroy_wait_days":3,"destroy_wait_days":4}}`, 400, "invalid-request"},
		{"duplicate through a long s (U+017F folds to s)", "POST", "/v1/keys", json, `{"name":"k","kind":"ml-dsa-65","policy":{"destroy_wait_days":3,"de\u017ftroy_wait_days":4}}`, 400, "invalid-request"},
		{"trailing data", "POST", "/v1/keys", json, `{"name":"k","kind":"ml-dsa-65"} {}`, 400, "invalid-request"},
		{"trailing garbage", "POST", "/v1/keys", json, `{"name":"k","kind":"ml-dsa-65"}x`, 400, "invalid-request"},
		{"not an object", "POST", "/v1/keys", json, `["k"]`, 400, "invalid-request"},
		{"truncated", "POST", "/v1/keys", json, `{"name":"k",`, 400, "invalid-request"},
		{"empty body", "POST", "/v1/keys", json, ``, 400, "invalid-request"},
		{"wrong media type", "POST", "/v1/keys", "text/plain", `{"name":"k","kind":"ml-dsa-65"}`, 415, "unsupported-media-type"},
		// Contract deviations the review found (accepted before).
		{"no content type", "POST", "/v1/keys", "", `{"name":"k","kind":"ml-dsa-65"}`, 415, "unsupported-media-type"},
		{"destroy_wait_days 0", "POST", "/v1/keys", json, `{"name":"k","kind":"ml-dsa-65","policy":{"destroy_wait_days":0}}`, 400, "invalid-request"},
		{"schedule-destroy days 0", "POST", "/v1/keys/sig/versions/1/schedule-destroy", json, `{"days":0}`, 400, "invalid-request"},
		{"sign message as array", "POST", "/v1/keys/sig/sign", json, `{"message":[104,105]}`, 400, "invalid-request"},
		{"sign context as array", "POST", "/v1/keys/sig/sign", json, `{"message":"aGk=","context":[1]}`, 400, "invalid-request"},
		{"verify signature as array", "POST", "/v1/keys/sig/verify", json, `{"message":"aGk=","signature":[1,2],"version":2}`, 400, "invalid-request"},
		{"decapsulate ciphertext as array", "POST", "/v1/keys/kem/decapsulate", json, `{"ciphertext":[1,2],"version":1}`, 400, "invalid-request"},
		{"policy days 0..365", "POST", "/v1/keys", json, `{"name":"k","kind":"ml-dsa-65","policy":{"destroy_wait_days":366}}`, 400, "invalid-request"},
		{"policy op of other kind", "POST", "/v1/keys", json, `{"name":"k","kind":"ml-dsa-65","policy":{"allowed_operations":["decapsulate"]}}`, 400, "invalid-request"},
		{"body too large", "POST", "/v1/keys/sig/sign", json, big, 413, "body-too-large"},
		{"sign bad base64", "POST", "/v1/keys/sig/sign", json, `{"message":"***"}`, 400, "invalid-request"},
		{"sign no message", "POST", "/v1/keys/sig/sign", json, `{}`, 400, "invalid-request"},
		{"sign long context", "POST", "/v1/keys/sig/sign", json, `{"message":"","context":"` + b64(make([]byte, 256)) + `"}`, 400, "invalid-request"},
		{"sign with kem key", "POST", "/v1/keys/kem/sign", json, `{"message":"aGk="}`, 409, "failed-precondition"},
		{"sign missing key", "POST", "/v1/keys/nope/sign", json, `{"message":"aGk="}`, 404, "not-found"},
		{"verify no version", "POST", "/v1/keys/sig/verify", json, `{"message":"aGk=","signature":"aGk="}`, 400, "invalid-request"},
		{"verify version string", "POST", "/v1/keys/sig/verify", json, `{"message":"aGk=","signature":"aGk=","version":"1"}`, 400, "invalid-request"},
		{"verify negative version", "POST", "/v1/keys/sig/verify", json, `{"message":"aGk=","signature":"aGk=","version":-1}`, 400, "invalid-request"},
		{"verify missing version", "POST", "/v1/keys/sig/verify", json, `{"message":"aGk=","signature":"aGk=","version":9}`, 404, "not-found"},
		{"verify disabled version", "POST", "/v1/keys/sig/verify", json, `{"message":"aGk=","signature":"aGk=","version":1}`, 409, "failed-precondition"},
		{"decapsulate short ct", "POST", "/v1/keys/kem/decapsulate", json, `{"ciphertext":"aGk=","version":1}`, 400, "invalid-request"},
		{"decapsulate with sig key", "POST", "/v1/keys/sig/decapsulate", json, `{"ciphertext":"aGk=","version":2}`, 409, "failed-precondition"},
		{"version zero", "GET", "/v1/keys/sig/versions/0/public-key", "", "", 400, "invalid-request"},
		{"version leading zero", "GET", "/v1/keys/sig/versions/01/public-key", "", "", 400, "invalid-request"},
		{"version word", "GET", "/v1/keys/sig/versions/latest/public-key", "", "", 400, "invalid-request"},
		{"version huge", "GET", "/v1/keys/sig/versions/99999999999999999999/public-key", "", "", 400, "invalid-request"},
		{"public key of disabled", "GET", "/v1/keys/sig/versions/1/public-key", "", "", 409, "failed-precondition"},
		{"bad name in path", "GET", "/v1/keys/BAD", "", "", 400, "invalid-request"},
		{"identity by path", "GET", "/v1/keys/_identity", "", "", 400, "invalid-request"},
		{"disable primary", "POST", "/v1/keys/sig/versions/2/disable", "", "", 409, "failed-precondition"},
		{"disable twice", "POST", "/v1/keys/sig/versions/1/disable", "", "", 409, "failed-precondition"},
		{"enable enabled", "POST", "/v1/keys/sig/versions/2/enable", "", "", 409, "failed-precondition"},
		{"disable 'primary'", "POST", "/v1/keys/sig/versions/primary/disable", "", "", 400, "invalid-request"},
		{"cancel unscheduled", "POST", "/v1/keys/sig/versions/1/cancel-destroy", "", "", 409, "failed-precondition"},
		{"destroy days 0", "POST", "/v1/keys/sig/versions/1/schedule-destroy", json, `{"days":366}`, 400, "invalid-request"},
		{"destroy days negative", "POST", "/v1/keys/sig/versions/1/schedule-destroy", json, `{"days":-1}`, 400, "invalid-request"},
		{"destroy primary", "POST", "/v1/keys/sig/versions/2/schedule-destroy", "", "", 409, "failed-precondition"},
		{"destroy unknown field", "POST", "/v1/keys/sig/versions/1/schedule-destroy", json, `{"weeks":1}`, 400, "invalid-request"},
		{"rotate with body", "POST", "/v1/keys/sig/rotate", json, `{"force":true}`, 400, "invalid-request"},
		{"rotate missing key", "POST", "/v1/keys/nope/rotate", "", "", 404, "not-found"},
		{"patch nothing", "PATCH", "/v1/keys/sig", json, `{}`, 400, "invalid-request"},
		{"patch min above primary", "PATCH", "/v1/keys/sig", json, `{"min_decryption_version":3}`, 400, "invalid-request"},
		{"patch min zero", "PATCH", "/v1/keys/sig", json, `{"min_decryption_version":0}`, 400, "invalid-request"},
		{"list limit", "GET", "/v1/keys?limit=0", "", "", 400, "invalid-request"},
		{"list limit word", "GET", "/v1/keys?limit=all", "", "", 400, "invalid-request"},
		{"list page token", "GET", "/v1/keys?page_token=%2F..", "", "", 400, "invalid-request"},
		{"token bad role", "POST", "/v1/tokens", json, `{"role":"root","keys":["*"]}`, 400, "invalid-request"},
		{"token no keys", "POST", "/v1/tokens", json, `{"role":"worker","keys":[]}`, 400, "invalid-request"},
		{"token bad pattern", "POST", "/v1/tokens", json, `{"role":"worker","keys":["["]}`, 400, "invalid-request"},
		{"unknown endpoint", "GET", "/v1/nothing", "", "", 404, "not-found"},
		{"wrong method", "DELETE", "/v1/keys/sig", "", "", 405, "method-not-allowed"},
		// Audit settings and records cannot be changed through the API.
		{"rewrite audit records", "POST", "/v1/audit/records", json, `{}`, 405, "method-not-allowed"},
		{"delete audit records", "DELETE", "/v1/audit/records?start=0&end=1", "", "", 405, "method-not-allowed"},
		{"replace checkpoint", "PUT", "/v1/audit/checkpoint", json, `{}`, 405, "method-not-allowed"},
		{"audit settings", "PATCH", "/v1/audit/settings", json, `{"enabled":false}`, 404, "not-found"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := e.snapshot()
			st, h, body := e.raw(c.method, c.path, e.admin, c.ctype, c.body)
			if st != c.status {
				t.Fatalf("status %d, want %d: %s", st, c.status, body)
			}
			if h.Get("Content-Type") != "application/problem+json" {
				t.Fatalf("Content-Type %q", h.Get("Content-Type"))
			}
			if typ := problemType(t, body); typ != c.typ {
				t.Fatalf("type %q, want %q", typ, c.typ)
			}
			if len(body) > 2000 {
				t.Fatalf("the problem echoes the input (%d bytes)", len(body))
			}
			if e.snapshot() != before {
				t.Fatal("the refused request changed state")
			}
		})
	}
	// A base64 field that does not decode is named.
	st, _, b := e.raw("POST", "/v1/keys/sig/sign", e.admin, json, `{"message":"not base64!"}`)
	if st != 400 || !strings.Contains(string(b), `field \"message\" is not valid standard base64`) {
		t.Errorf("sign with bad base64: %d %s", st, b)
	}
}

func TestPaginationAndPatch(t *testing.T) {
	e := newEnv(t)
	c := e.client(e.admin)
	for _, n := range []string{"a1", "a2", "a3", "b1", "b2"} {
		if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: n, Kind: "ml-kem-512"}); err != nil {
			t.Fatal(err)
		}
	}
	var names []string
	tok := ""
	for i := 0; i < 10; i++ {
		page, err := c.ListKeys(ctx, 2, tok)
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range page.Keys {
			names = append(names, k.Name)
		}
		if tok = page.NextPageToken; tok == "" {
			break
		}
	}
	if strings.Join(names, ",") != "a1,a2,a3,b1,b2" {
		t.Fatalf("listed %v", names)
	}
	c.Rotate(ctx, "a1")
	two := uint64(2)
	k, err := c.UpdateKey(ctx, "a1", client.UpdateKeyRequest{MinDecryptionVersion: &two, Policy: &client.Policy{DestroyWaitDays: 7}})
	if err != nil || k.MinDecryptionVersion != 2 || k.Policy.DestroyWaitDays != 7 {
		t.Fatalf("patch: %+v %v", k, err)
	}
	if _, err := c.Decapsulate(ctx, "a1", 1, make([]byte, 768)); !client.IsProblem(err, "failed-precondition") {
		t.Fatalf("decapsulate below min_decryption_version: %v", err)
	}
	v, err := c.VersionAction(ctx, "a1", 1, "schedule-destroy", 0)
	if err != nil || v.DestroyAt == nil || v.DestroyAt.Sub(e.clock.Now()) != 7*24*time.Hour {
		t.Fatalf("schedule-destroy uses the policy's 7 days: %+v %v", v, err)
	}
	if v, err := c.VersionAction(ctx, "a1", 1, "cancel-destroy", 0); err != nil || v.State != "disabled" {
		t.Fatalf("cancel-destroy: %+v %v", v, err)
	}
	if v, err := c.VersionAction(ctx, "a1", 1, "enable", 0); err != nil || v.State != "enabled" {
		t.Fatalf("enable: %+v %v", v, err)
	}
}

// TestTokenEscalationRefused is the review's finding: an admin token for
// team-a-* minted an admin token for *, which then signed with a team-b
// key. Now the mint is refused and nothing is created.
func TestTokenEscalationRefused(t *testing.T) {
	e := newEnv(t)
	root := e.client(e.admin)
	if _, err := root.CreateKey(ctx, client.CreateKeyRequest{Name: "team-b-sig", Kind: "ml-dsa-44"}); err != nil {
		t.Fatal(err)
	}
	a, err := root.CreateToken(ctx, client.CreateTokenRequest{Role: "admin", Keys: []string{"team-a-*"}})
	if err != nil {
		t.Fatal(err)
	}
	ta := e.client(a.Token)
	before := e.snapshot()
	for _, req := range []client.CreateTokenRequest{
		{Role: "admin", Keys: []string{"*"}},
		{Role: "admin", Keys: []string{"team-*"}},
		{Role: "worker", Keys: []string{"team-b-*"}},
		{Role: "decryptor", Keys: []string{"team-a*"}},
		{Role: "admin", Keys: []string{"team-a-*", "team-b-sig"}},
	} {
		if _, err := ta.CreateToken(ctx, req); client.StatusOf(err) != http.StatusForbidden {
			t.Errorf("team-a admin mints %+v: %v, want 403", req, err)
		}
	}
	if _, err := root.CreateToken(ctx, client.CreateTokenRequest{Role: "auditor", Keys: []string{"team-a-*"}}); client.StatusOf(err) != http.StatusBadRequest {
		t.Errorf("scoped auditor: %v, want 400", err)
	}
	if _, err := root.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"*"}, TTL: "soon"}); client.StatusOf(err) != http.StatusBadRequest {
		t.Errorf("ttl soon: %v, want 400", err)
	}
	if e.snapshot() != before {
		t.Fatal("a refused mint changed state")
	}
	if _, err := ta.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"team-a-prod-*"}}); err != nil {
		t.Fatalf("a narrower token: %v", err)
	}
	if _, err := ta.Sign(ctx, "team-b-sig", []byte("m"), nil); client.StatusOf(err) != http.StatusForbidden {
		t.Fatalf("team-a admin signs with team-b: %v", err)
	}
}

// TestTokenListRevokeExpire: tokens are listed without secrets, a revoked
// token is refused at once on a connection already open, an expired one
// with the token-expired problem, and each token change is audited with
// the token's id.
func TestTokenListRevokeExpire(t *testing.T) {
	e := newEnv(t)
	root := e.client(e.admin)
	w, err := root.CreateToken(ctx, client.CreateTokenRequest{Name: "w", Role: "worker", Keys: []string{"*"}})
	if err != nil {
		t.Fatal(err)
	}
	short, err := root.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"*"}, TTL: "1h"})
	if err != nil || short.ExpiresAt == nil {
		t.Fatalf("ttl: %+v %v", short, err)
	}
	wc := e.client(w.Token) // the same http.Client: its connection is kept alive
	if _, err := wc.ListKeys(ctx, 0, ""); err != nil {
		t.Fatal(err)
	}
	st, _, body := e.raw("GET", "/v1/tokens", e.admin, "", "")
	if st != 200 || strings.Contains(string(body), w.Token) || strings.Contains(string(body), e.admin) || strings.Contains(string(body), `"token"`) || strings.Contains(string(body), "hash") {
		t.Fatalf("token list: %d %s", st, body)
	}
	var list client.TokenList
	json.Unmarshal(body, &list)
	if len(list.Tokens) != 3 {
		t.Fatalf("%d tokens listed", len(list.Tokens))
	}
	got, err := root.GetToken(ctx, w.ID)
	if err != nil || got.Name != "w" || got.LastUsedAt == nil || got.CreatedBy == "" {
		t.Fatalf("GetToken: %+v %v", got, err)
	}
	if _, err := wc.ListTokens(ctx, 0, ""); client.StatusOf(err) != http.StatusForbidden {
		t.Fatalf("a worker lists tokens: %v", err)
	}
	rv, err := root.RevokeToken(ctx, w.ID)
	if err != nil || rv.RevokedAt == nil {
		t.Fatalf("revoke: %+v %v", rv, err)
	}
	if _, err := wc.ListKeys(ctx, 0, ""); client.StatusOf(err) != http.StatusUnauthorized {
		t.Fatalf("a revoked token on an open connection: %v", err)
	}
	if _, err := root.RevokeToken(ctx, w.ID); client.StatusOf(err) != http.StatusConflict {
		t.Fatalf("revoke twice: %v", err)
	}
	me := strings.Split(e.admin, "_")[1]
	if _, err := root.RevokeToken(ctx, me); client.StatusOf(err) != http.StatusConflict || strings.Contains(err.Error(), "key or version") || !strings.Contains(err.Error(), "last active admin token") {
		t.Fatalf("revoking the only root admin (its 409 is about the token, not a key): %v", err)
	}
	for _, bad := range []string{"nothex", "0000000000000000", "kms_x"} {
		if _, err := root.GetToken(ctx, bad); client.StatusOf(err) != http.StatusBadRequest && client.StatusOf(err) != http.StatusNotFound {
			t.Fatalf("GetToken(%q): %v", bad, err)
		}
	}
	e.clock.Add(time.Hour)
	st, _, body = e.raw("GET", "/v1/keys", short.Token, "", "")
	if st != 401 || problemType(t, body) != "token-expired" {
		t.Fatalf("expired token: %d %s", st, body)
	}
	// The audit log names the token each change touched, never a secret.
	n, _ := e.store.Audit().AuditSize(ctx)
	recs, err := e.store.Audit().AuditRecords(ctx, 0, n)
	if err != nil {
		t.Fatal(err)
	}
	created, revoked := false, false
	for _, b := range recs {
		for _, secret := range []string{w.Token, short.Token, e.admin} {
			if strings.Contains(string(b), secret) {
				t.Fatalf("a secret in the audit log: %s", b)
			}
		}
		r, _ := kms.DecodeAuditRecord(b)
		created = created || (r.Operation == "POST /v1/tokens" && r.Token == w.ID && r.Status == 201)
		revoked = revoked || (r.Operation == "DELETE /v1/tokens/{id}" && r.Token == w.ID && r.Status == 200)
	}
	if !created || !revoked {
		t.Fatalf("token records: created %v revoked %v", created, revoked)
	}
}
