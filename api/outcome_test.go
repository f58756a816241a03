package api_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sync/atomic"
	"testing"

	"github.com/kmsd-project/kmsd/kms"
)

// unknownStore commits a rotation and then says the outcome is unknown,
// as the etcd store does when etcd did not answer within its budget.
type unknownStore struct {
	kms.Store
	on *atomic.Bool
}

func (u unknownStore) UpdateKey(ctx context.Context, name string, fn func(kms.KeyTx) ([]*kms.AuditRecord, error)) error {
	err := u.Store.UpdateKey(ctx, name, fn)
	if err == nil && u.on.Load() {
		return fmt.Errorf("etcd: injected: context deadline exceeded: %w", kms.ErrOutcomeUnknown)
	}
	return err
}

// TestOutcomeUnknown: a change whose outcome the store could not learn
// is answered 503 with the distinct outcome-unknown problem (never the
// "unavailable" that says nothing was done), and the audit log holds one
// record of the request, the one that committed with the change, not a
// second one saying 503 (issue 24: a rotation committed during an etcd
// leader kill had two records, 201 and 503).
func TestOutcomeUnknown(t *testing.T) {
	var on atomic.Bool
	e := newEnvOn(t, "bolt", nil, func(s kms.Store) kms.Store { return unknownStore{s, &on} }, nil)
	if st, _, body := e.raw("POST", "/v1/keys", e.admin, "application/json", `{"name":"k","kind":"ml-dsa-65"}`); st != 201 {
		t.Fatalf("create: %d %s", st, body)
	}
	on.Store(true)
	st, h, body := e.raw("POST", "/v1/keys/k/rotate", e.admin, "application/json", ``)
	var p struct{ Type, Detail string }
	_ = json.Unmarshal(body, &p)
	if st != http.StatusServiceUnavailable || p.Type != "urn:kmsd:problem:outcome-unknown" {
		t.Fatalf("rotate: %d %s", st, body)
	}
	id := h.Get("X-Request-Id")
	n := 0
	for _, line := range e.auditLog() {
		r, err := kms.DecodeAuditRecord(line)
		if err != nil {
			t.Fatal(err)
		}
		if r.RequestID == id {
			n++
			if r.Version != 2 || r.Status/100 != 2 {
				t.Errorf("the rotation's record: %+v", r)
			}
		}
	}
	if n != 1 {
		t.Fatalf("%d records of request %s, want the one committed with the change", n, id)
	}
}
