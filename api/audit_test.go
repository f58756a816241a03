package api_test

import (
	"bytes"
	"context"
	"crypto/mlkem"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"

	"golang.org/x/mod/sumdb/tlog"

	"github.com/kmsd-project/kmsd/api"
	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/audit"
	"github.com/kmsd-project/kmsd/kms"
)

// auditLog fetches every record as the admin.
func (e *env) auditLog() [][]byte {
	e.t.Helper()
	size, err := e.store.Audit().AuditSize(context.Background())
	if err != nil {
		e.t.Fatal(err)
	}
	st, h, body := e.raw("GET", fmt.Sprintf("/v1/audit/records?start=0&end=%d", size), e.admin, "", "")
	if st != 200 || h.Get("Content-Type") != "application/jsonl" {
		e.t.Fatalf("records: %d %s", st, body)
	}
	lines := bytes.Split(bytes.TrimSuffix(body, []byte("\n")), []byte("\n"))
	if uint64(len(lines)) != size {
		e.t.Fatalf("%d lines for %d records", len(lines), size)
	}
	return lines
}

// TestEveryRequestAudited: every request, answered or refused, authenticated
// or not, has exactly one record naming it, with its status; state changes
// name their key and version; the SIEM stream got the same bytes.
func TestEveryRequestAudited(t *testing.T) {
	e := newEnv(t)
	worker, _ := e.client(e.admin).CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"*"}})
	type call struct {
		method, path, token, body string
		status                    int
		key                       string
		version                   uint64
	}
	calls := []call{
		{"POST", "/v1/keys", e.admin, `{"name":"k1","kind":"ml-dsa-65"}`, 201, "k1", 1},
		{"POST", "/v1/keys/k1/rotate", e.admin, ``, 201, "k1", 2},
		{"POST", "/v1/keys/k1/sign", e.admin, `{"message":"aGk="}`, 200, "k1", 2},
		{"POST", "/v1/keys/k1/versions/1/disable", e.admin, ``, 200, "k1", 1},
		{"POST", "/v1/keys/k1/versions/2/disable", e.admin, ``, 409, "k1", 2},
		{"GET", "/v1/keys/k1/versions/primary/public-key", worker.Token, ``, 200, "k1", 2},
		{"POST", "/v1/keys/k1/sign", worker.Token, `{"message":"aGk="}`, 403, "k1", 0},
		{"GET", "/v1/keys/k1", "", ``, 401, "", 0},
		{"GET", "/v1/keys/k1", "kms_0000000000000000_forged", ``, 401, "", 0},
		{"GET", "/v1/nowhere", e.admin, ``, 404, "", 0},
		{"POST", "/v1/keys", e.admin, `{"name":"BAD","kind":"ml-dsa-65"}`, 400, "BAD", 0},
		{"GET", "/healthz", "", ``, 200, "", 0},
	}
	ids := map[string]call{}
	for _, c := range calls {
		st, h, body := e.raw(c.method, c.path, c.token, "application/json", c.body)
		if st != c.status {
			t.Fatalf("%s %s: %d %s", c.method, c.path, st, body)
		}
		ids[h.Get("X-Request-Id")] = c
	}
	recs := e.auditLog()
	found := map[string]int{}
	for i, line := range recs {
		r, err := kms.DecodeAuditRecord(line)
		if err != nil || r.Index != uint64(i) {
			t.Fatalf("record %d: %v %+v", i, err, r)
		}
		c, ok := ids[r.RequestID]
		if !ok {
			continue
		}
		found[r.RequestID]++
		if r.Status != c.status || r.Key != c.key || r.Version != c.version {
			t.Errorf("%s %s: record %+v; want status %d key %q version %d", c.method, c.path, r, c.status, c.key, c.version)
		}
		switch {
		case c.token == "" || strings.Contains(c.token, "forged"):
			if r.Actor != "anonymous" || r.Role != "" {
				t.Errorf("unauthenticated request recorded as %q/%q", r.Actor, r.Role)
			}
		case c.token == e.admin && c.status != 404: // an unrouted request is never authenticated
			if r.Role != "admin" || r.Actor == "" || strings.Contains(e.admin, r.Actor) == false {
				t.Errorf("admin request recorded as %q/%q", r.Actor, r.Role)
			}
		}
		if r.Source == "" || !strings.HasPrefix(r.Operation, c.method+" ") {
			t.Errorf("record lacks source or operation: %+v", r)
		}
	}
	for id, c := range ids {
		if found[id] != 1 {
			t.Errorf("%s %s has %d records, want 1", c.method, c.path, found[id])
		}
	}
	// The stream saw every committed record, byte for byte.
	e.stream.mu.Lock()
	streamed := e.stream.recs
	e.stream.mu.Unlock()
	inLog := map[string]bool{}
	for _, l := range recs {
		inLog[string(l)] = true
	}
	for _, s := range streamed {
		r, _ := kms.DecodeAuditRecord(s)
		if r.Index >= uint64(len(recs)) {
			continue // the records request itself, committed after it read the log
		}
		if !inLog[string(s)] {
			t.Fatalf("streamed record not in the log: %s", s)
		}
	}
	if len(streamed) < len(calls) {
		t.Fatalf("%d records streamed for %d calls", len(streamed), len(calls))
	}
}

// TestAuditEndpointsAndProofs: the checkpoint verifies with the identity key,
// the records reproduce its root, and the proofs check.
func TestAuditEndpointsAndProofs(t *testing.T) {
	e := newEnv(t)
	admin := e.client(e.admin)
	for i := 0; i < 20; i++ {
		admin.CreateKey(ctx, client.CreateKeyRequest{Name: fmt.Sprintf("k%d", i), Kind: "ml-kem-512"})
	}
	aud, _ := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "auditor", Keys: []string{"*"}})
	if st, _, body := e.raw("GET", "/v1/audit/checkpoint", aud.Token, "", ""); st != 404 || problemType(t, body) != "not-found" {
		t.Fatalf("checkpoint before the first: %d %s", st, body)
	}
	size, err := e.alog.Checkpoint(ctx)
	if err != nil {
		t.Fatal(err)
	}
	st, h, cp := e.raw("GET", "/v1/audit/checkpoint", aud.Token, "", "")
	if st != 200 || !strings.HasPrefix(h.Get("Content-Type"), "text/plain") {
		t.Fatalf("checkpoint: %d %s", st, cp)
	}
	c, err := audit.OpenCheckpoint(cp, e.idPub)
	if err != nil || c.Size != size {
		t.Fatalf("checkpoint: %+v %v", c, err)
	}
	recs := e.auditLog()
	res, tree, err := audit.Verify(e.idPub, recs, [][]byte{cp}, nil)
	if err != nil || res.Size != size {
		t.Fatalf("verify: %v", err)
	}
	var p struct {
		Proof [][]byte `json:"proof"`
	}
	for _, i := range []uint64{0, size / 2, size - 1} {
		st, _, body := e.raw("GET", fmt.Sprintf("/v1/audit/proof/inclusion?index=%d&size=%d", i, size), aud.Token, "", "")
		if st != 200 || json.Unmarshal(body, &p) != nil {
			t.Fatalf("inclusion: %d %s", st, body)
		}
		if err := tlog.CheckRecord(hashes(p.Proof), int64(size), c.Root, int64(i), tree.Leaf(i)); err != nil {
			t.Fatalf("inclusion proof of %d: %v", i, err)
		}
	}
	st, _, body := e.raw("GET", fmt.Sprintf("/v1/audit/proof/consistency?old=%d&size=%d", 3, size), aud.Token, "", "")
	if st != 200 || json.Unmarshal(body, &p) != nil {
		t.Fatalf("consistency: %d %s", st, body)
	}
	old, _ := tree.Root(3)
	if err := tlog.CheckTree(hashes(p.Proof), int64(size), c.Root, 3, old); err != nil {
		t.Fatalf("consistency proof: %v", err)
	}
	for _, bad := range []string{"/v1/audit/proof/inclusion?index=5&size=5", "/v1/audit/proof/inclusion?index=x&size=5",
		"/v1/audit/proof/consistency?old=0&size=3", "/v1/audit/proof/consistency?old=4&size=3",
		"/v1/audit/records?start=5&end=2", "/v1/audit/records?start=0&end=999999", "/v1/audit/records?start=-1&end=2"} {
		if st, _, body := e.raw("GET", bad, aud.Token, "", ""); st != 400 {
			t.Errorf("%s: %d %s", bad, st, body)
		}
	}
	// The auditor reads the log but no keys; a worker reads no log.
	if _, err := e.client(aud.Token).GetKey(ctx, "k1"); client.StatusOf(err) != 403 {
		t.Fatalf("auditor reads a key: %v", err)
	}
	w, _ := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"*"}})
	if st, _, _ := e.raw("GET", "/v1/audit/checkpoint", w.Token, "", ""); st != 403 {
		t.Fatalf("worker reads the checkpoint: %d", st)
	}
}

func hashes(p [][]byte) []tlog.Hash {
	out := make([]tlog.Hash, len(p))
	for i := range p {
		copy(out[i][:], p[i])
	}
	return out
}

// TestNoSecretsInAudit: key seeds, signed messages, signatures, shared
// secrets and tokens seeded through the API never appear in the audit
// records or the operational log.
func TestNoSecretsInAudit(t *testing.T) {
	e := newEnv(t)
	admin := e.client(e.admin)
	var secrets [][]byte
	secrets = append(secrets, []byte(e.admin))
	tok, _ := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"*"}})
	secrets = append(secrets, []byte(tok.Token))
	admin.CreateKey(ctx, client.CreateKeyRequest{Name: "sig", Kind: "ml-dsa-65"})
	admin.CreateKey(ctx, client.CreateKeyRequest{Name: "kem", Kind: "ml-kem-768"})
	msg := []byte("TOP-SECRET-MESSAGE-0123456789")
	sig, err := admin.Sign(ctx, "sig", msg, []byte("SECRET-CONTEXT"))
	if err != nil {
		t.Fatal(err)
	}
	secrets = append(secrets, msg, []byte("SECRET-CONTEXT"), sig.Signature[:64])
	pub, _ := admin.PublicKey(ctx, "kem", 1)
	ek, _ := mlkem.NewEncapsulationKey768(pub.PublicKey)
	ss, ct := ek.Encapsulate()
	if got, err := admin.Decapsulate(ctx, "kem", 1, ct); err != nil || !bytes.Equal(got.SharedSecret, ss) {
		t.Fatal(err)
	}
	secrets = append(secrets, ss, ct[:64])
	admin.Verify(ctx, "sig", 1, msg, sig.Signature, []byte("SECRET-CONTEXT"))
	// Every seed the service drew.
	for _, b := range e.rand.Taken() {
		if len(b) == 32 || len(b) == 64 {
			secrets = append(secrets, b)
		}
	}
	e.alog.Checkpoint(ctx)
	recs := bytes.Join(e.auditLog(), []byte("\n"))
	cp, _ := e.alog.Latest(ctx)
	haystacks := map[string][]byte{"audit records": recs, "checkpoint": cp, "operational log": []byte(e.log.String())}
	for name, hay := range haystacks {
		for _, s := range secrets {
			for _, form := range [][]byte{s, []byte(base64.StdEncoding.EncodeToString(s)), []byte(fmt.Sprintf("%x", s))} {
				if len(form) >= 8 && bytes.Contains(hay, form) {
					t.Fatalf("%s holds a secret (%d bytes)", name, len(s))
				}
			}
		}
	}
	if len(secrets) < 10 {
		t.Fatalf("only %d secrets seeded", len(secrets))
	}
	// And the raw bbolt file holds no seed in plaintext either.
	db, _ := os.ReadFile(e.bolt.Path())
	for _, s := range secrets[len(secrets)-2:] {
		if bytes.Contains(db, s) {
			t.Fatal("a seed is in the database file")
		}
	}
}

// failingAudit refuses appends, as a log that cannot be made durable.
type failingAudit struct {
	kms.AuditStore
	fail *atomic.Bool
}

func (f failingAudit) AppendAudit(ctx context.Context, r *kms.AuditRecord) error {
	if f.fail.Load() {
		return errors.New("injected: fsync audit log: input/output error")
	}
	return f.AuditStore.AppendAudit(ctx, r)
}

// TestAuditFailClosed (on bbolt and on etcd): when a record cannot be made durable the client gets
// 503 and never the answer (no signature, no shared secret, no key).
func TestAuditFailClosed(t *testing.T) {
	for _, b := range backends {
		t.Run(b, func(t *testing.T) { testAuditFailClosed(t, b) })
	}
}

func testAuditFailClosed(t *testing.T, backend string) {
	var fail atomic.Bool
	e := newEnvOn(t, backend, nil, nil, func(a kms.AuditStore) kms.AuditStore { return failingAudit{a, &fail} })
	admin := e.client(e.admin)
	admin.CreateKey(ctx, client.CreateKeyRequest{Name: "sig", Kind: "ml-dsa-65"})
	fail.Store(true)
	for _, c := range []struct{ method, path, body string }{
		{"POST", "/v1/keys/sig/sign", `{"message":"aGk="}`},
		{"GET", "/v1/keys/sig/versions/1/public-key", ``},
		{"GET", "/v1/keys/sig", ``},
		{"GET", "/healthz", ``},
	} {
		st, _, body := e.raw(c.method, c.path, e.admin, "application/json", c.body)
		if st != 503 || problemType(t, body) != "unavailable" || bytes.Contains(body, []byte("signature")) || bytes.Contains(body, []byte("public_key")) {
			t.Fatalf("%s %s with the audit log down: %d %s", c.method, c.path, st, body)
		}
		if bytes.Contains(body, []byte("injected")) {
			t.Fatal("the problem leaks the cause")
		}
	}
	fail.Store(false)
	if _, err := admin.Sign(ctx, "sig", []byte("m"), nil); err != nil {
		t.Fatalf("after recovery: %v", err)
	}
	_ = io.EOF
	_ = http.StatusOK
}

// TestPastedTokenNotEchoed is the review's finding: a token pasted into a
// URL path came back verbatim in the error body, the log, the SIEM stream
// and the audit record. Now a segment that fails validation is shown only
// as a short hash, and a long junk path costs a bounded record.
func TestPastedTokenNotEchoed(t *testing.T) {
	e := newEnv(t)
	tok := e.admin
	secret := tok[len(tok)-20:] // any piece of the secret part
	junk := strings.Repeat("x", 200)
	paths := []struct{ method, path string }{
		{"GET", "/v1/keys/" + tok},
		{"GET", "/v1/keys/" + tok + "/versions/primary/public-key"},
		{"POST", "/v1/keys/" + tok + "/rotate"},
		{"GET", "/v1/operations/" + tok},
		{"GET", "/v1/tokens/" + tok},
		{"DELETE", "/v1/tokens/" + tok},
		{"GET", "/v1/" + tok},
		{"GET", "/" + tok + "/" + junk},
		{"GET", "/v1/keys/Upper" + junk},
	}
	for _, p := range paths {
		st, _, body := e.raw(p.method, p.path, e.admin, "", "")
		if st < 400 || strings.Contains(string(body), secret) || strings.Contains(string(body), junk) {
			t.Errorf("%s %s: %d %s", p.method, p.path, st, body)
		}
	}
	if strings.Contains(e.log.String(), secret) || strings.Contains(e.log.String(), junk) {
		t.Error("the pasted token or the junk reached the log")
	}
	n, _ := e.store.Audit().AuditSize(ctx)
	recs, err := e.store.Audit().AuditRecords(ctx, 0, n)
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range recs {
		if strings.Contains(string(b), secret) || strings.Contains(string(b), "xxxxxxxxxx") {
			t.Errorf("audit record holds the pasted input: %s", b)
		}
		if len(b) > 600 {
			t.Errorf("audit record of %d bytes: %s", len(b), b)
		}
	}
	e.stream.mu.Lock()
	for _, b := range e.stream.recs {
		if strings.Contains(string(b), secret) {
			t.Errorf("SIEM stream holds the pasted token: %s", b)
		}
	}
	e.stream.mu.Unlock()
}

// TestDeepJSONRefusedCheaply: a 1 MiB body nested half a million levels
// deep cost 30-70 MiB to refuse; now it is refused by a scan of the bytes.
func TestDeepJSONRefusedCheaply(t *testing.T) {
	e := newEnv(t)
	deep := `{"name":"k","kind":"ml-dsa-65","policy":{"params":` + strings.Repeat("[", (1<<20)-100) + `}}`
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	st, _, body := e.raw("POST", "/v1/keys", e.admin, "application/json", deep)
	runtime.ReadMemStats(&after)
	if st != 400 || !strings.Contains(string(body), "nests deeper") {
		t.Fatalf("deep body: %d %s", st, body)
	}
	// The body is read (1 MiB) and copied by the test's spec checker; the
	// old decoder allocated tens of MiB on top.
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 12<<20 {
		t.Fatalf("refusing the deep body allocated %d MiB", alloc>>20)
	}
	// Nesting the API uses is fine.
	if st, _, body := e.raw("POST", "/v1/keys", e.admin, "application/json", `{"name":"ok","kind":"ckks","policy":{"params":{"LogN":13,"LogQ":[45,35],"LogP":[45],"LogDefaultScale":35,"Xe":{"Type":"DiscreteGaussian","Sigma":3.2,"Bound":19.2}}}}`); st != 201 {
		t.Fatalf("ordinary nesting: %d %s", st, body)
	}
}

// TestUnauthenticatedFloodBounded is the review's finding: each anonymous
// request wrote a ~1 KB durable record, so one client could fill the disk.
// Past a per-address limit, requests without a valid token get 429 and are
// summarized in one record per address and window; a valid token from the
// same address is not held back; a per-token limit, when set, applies.
func TestUnauthenticatedFloodBounded(t *testing.T) {
	// Refills slow enough (one request per 100 s) that a slow run earns no
	// extra answer: 5 anonymous requests, then 1 per token (burst
	// ceil(2 x 0.01)).
	testOptions = func(o *api.Options) { o.UnauthRate, o.UnauthBurst, o.TokenRate = 0.01, 5, 0.01 }
	defer func() { testOptions = nil }()
	e := newEnv(t)
	before, _ := e.store.Audit().AuditSize(ctx)
	statuses := map[int]int{}
	for i := 0; i < 200; i++ {
		st, h, body := e.raw("GET", "/v1/keys", "", "", "")
		if i < 100 {
			st2, _, _ := e.raw("GET", "/v1/keys", "kms_0000000000000000_forged", "", "")
			statuses[st2]++
		}
		statuses[st]++
		if st == 429 && (h.Get("Retry-After") == "" || problemType(t, body) != "rate-limited") {
			t.Fatalf("429 without Retry-After or problem: %v %s", h, body)
		}
	}
	if statuses[401] != 5 || statuses[429] != 295 {
		t.Fatalf("statuses %v, want 5 x 401 then 429", statuses)
	}
	after, _ := e.store.Audit().AuditSize(ctx)
	if after-before != 5 {
		t.Fatalf("%d records for 300 refused requests, want 5", after-before)
	}
	// A valid token from the flooding address still works; the per-token
	// limit then applies, with a record.
	for i, want := range []int{200, 429} {
		if st, _, body := e.raw("GET", "/v1/keys", e.admin, "", ""); st != want {
			t.Fatalf("authenticated request %d: %d %s", i, st, body)
		}
	}
	n, err := e.api.FlushRefusals(ctx, true)
	if err != nil || n != 1 {
		t.Fatalf("FlushRefusals: %d %v", n, err)
	}
	size, _ := e.store.Audit().AuditSize(ctx)
	recs, _ := e.store.Audit().AuditRecords(ctx, after, size)
	var summary *kms.AuditRecord
	limited := 0
	for _, b := range recs {
		r, _ := kms.DecodeAuditRecord(b)
		if r.Count > 0 {
			summary = r
		}
		if r.Status == 429 && r.Actor != "anonymous" {
			limited++
		}
	}
	if summary == nil || summary.Count != 295 || summary.Source != "127.0.0.1" || summary.First == "" || summary.Last < summary.First {
		t.Fatalf("summary: %+v", summary)
	}
	if limited != 1 {
		t.Fatalf("%d records of per-token refusals, want 1", limited)
	}
}
