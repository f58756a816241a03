package api_test

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/api/client/hekeys"
	"github.com/kmsd-project/kmsd/kms"
)

// TestLargeKeysetIsAnOperation: above the async threshold, create and
// rotate answer 202 with an operation that reports progress and ends with
// the new version; the request and the completion are both audited.
func TestLargeKeysetIsAnOperation(t *testing.T) {
	testAsyncKeysetBytes = 1 << 20 // every HE keyset here is larger
	defer func() { testAsyncKeysetBytes = 0 }()
	e := newEnv(t)
	st, h, body := e.raw("POST", "/v1/keys", e.admin, "application/json", `{"name":"big","kind":"ckks","policy":{"params":"ckks-logn13","rotations":[1,2,4,8],"relinearization":true}}`)
	if st != 202 || !strings.HasPrefix(h.Get("Location"), "/v1/operations/") {
		t.Fatalf("create: %d %v %s", st, h, body)
	}
	var op client.Operation
	json.Unmarshal(body, &op)
	if op.State != "running" || op.Key != "big" {
		t.Fatalf("operation %+v", op)
	}
	c := e.client(e.admin)
	var seen []client.Operation
	final, err := c.WaitOperation(ctx, op.ID, 10*time.Millisecond, func(o *client.Operation) { seen = append(seen, *o) })
	if err != nil {
		t.Fatal(err)
	}
	if final.State != "succeeded" || final.Version != 1 || final.Progress.Done != 6 || final.Progress.Total != 6 || final.Progress.Bytes == 0 {
		t.Fatalf("final operation %+v", final)
	}
	// The key is usable: its keys fetch and verify.
	f := &hekeys.Fetcher{BaseURL: e.url, Token: e.admin, IdentityKey: e.idPub, CacheDir: t.TempDir(), HTTP: e.httpc}
	if _, err := f.Fetch(ctx, "big", 1); err != nil {
		t.Fatal(err)
	}
	// Rotation too.
	v, op2, err := c.RotateOrOperation(ctx, "big")
	if err != nil || v != nil || op2 == nil {
		t.Fatalf("rotate: %v %v %v", v, op2, err)
	}
	if final, err := c.WaitOperation(ctx, op2.ID, 10*time.Millisecond, nil); err != nil || final.Version != 2 {
		t.Fatalf("rotate operation: %+v %v", final, err)
	}
	// Another token's readers only: a worker for other keys sees no such operation.
	w, _ := c.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"other-*"}})
	if _, err := e.client(w.Token).GetOperation(ctx, op.ID); client.StatusOf(err) != 404 {
		t.Fatalf("foreign worker reads the operation: %v", err)
	}
	if _, err := c.GetOperation(ctx, "nope"); client.StatusOf(err) != 404 {
		t.Fatalf("unknown operation: %v", err)
	}
	// Audit: the 202 and the background completion each have a record.
	var accepted, completed int
	for _, line := range e.auditLog() {
		r, _ := kms.DecodeAuditRecord(line)
		if r.Key == "big" && r.Operation == "POST /v1/keys" && r.Status == 202 {
			accepted++
		}
		if r.Key == "big" && strings.HasSuffix(r.Operation, "(completed in the background)") && r.Status == 201 {
			completed++
		}
	}
	if accepted != 1 || completed != 2 {
		t.Fatalf("records: %d accepted, %d completed; want 1 and 2 (create and rotate)", accepted, completed)
	}
	// A duplicate name is refused at once, not in the operation.
	if _, _, err := c.CreateKeyOrOperation(ctx, client.CreateKeyRequest{Name: "big", Kind: "ckks", Policy: &client.Policy{Params: json.RawMessage(`"ckks-logn13"`)}}); !client.IsProblem(err, "already-exists") {
		t.Fatalf("duplicate: %v", err)
	}
}

// TestGenerationSlotsFull: while a keyset generation runs (one slot by
// default), another answers 429 at once and creates nothing.
func TestGenerationSlotsFull(t *testing.T) {
	testAsyncKeysetBytes = 1 << 20
	defer func() { testAsyncKeysetBytes = 0 }()
	e := newEnv(t)
	c := e.client(e.admin)
	_, op, err := c.CreateKeyOrOperation(ctx, client.CreateKeyRequest{Name: "slow", Kind: "ckks",
		Policy: &client.Policy{Params: json.RawMessage(`"ckks-logn14"`), Rotations: []int{1, 2, 4, 8, 16, 32, 64, 128}, Relinearization: true}})
	if err != nil || op == nil {
		t.Fatalf("first: %v %v", op, err)
	}
	// Wait until it is generating (it holds the slot).
	for {
		o, err := c.GetOperation(ctx, op.ID)
		if err != nil {
			t.Fatal(err)
		}
		if o.Progress.Done >= 1 || o.State != "running" {
			if o.State != "running" {
				t.Fatalf("the first generation ended too soon to test: %+v", o)
			}
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	st, h, body := e.raw("POST", "/v1/keys", e.admin, "application/json", `{"name":"second","kind":"ckks","policy":{"params":"ckks-logn13","rotations":[1]}}`)
	if st != 429 || problemType(t, body) != "busy" || h.Get("Retry-After") == "" {
		t.Fatalf("second: %d %s", st, body)
	}
	if _, err := c.GetKey(ctx, "second"); !client.IsProblem(err, "not-found") {
		t.Fatalf("the refused create left a key: %v", err)
	}
	if _, err := c.WaitOperation(ctx, op.ID, 20*time.Millisecond, nil); err != nil {
		t.Fatal(err)
	}
}
