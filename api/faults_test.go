package api_test

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/kms/sealertest"
)

// fullStore fails every write as a full disk would, after the transaction
// function ran.
type fullStore struct {
	kms.Store
	full *atomic.Bool
}

var errFull = errors.New("injected: write /data/kms.db: no space left on device")

func (f fullStore) CreateKey(ctx context.Context, k *kms.Key, v *kms.Version, a []*kms.AuditRecord) error {
	if f.full.Load() {
		return errFull
	}
	return f.Store.CreateKey(ctx, k, v, a)
}

func (f fullStore) UpdateKey(ctx context.Context, name string, fn func(kms.KeyTx) ([]*kms.AuditRecord, error)) error {
	if f.full.Load() {
		return f.Store.UpdateKey(ctx, name, func(tx kms.KeyTx) ([]*kms.AuditRecord, error) {
			if _, err := fn(tx); err != nil {
				return nil, err
			}
			return nil, errFull
		})
	}
	return f.Store.UpdateKey(ctx, name, fn)
}

func (f fullStore) CreateToken(ctx context.Context, t *kms.Token, a []*kms.AuditRecord) error {
	if f.full.Load() {
		return errFull
	}
	return f.Store.CreateToken(ctx, t, a)
}

// TestFailingHSMAndFullDisk (on bbolt and on etcd): a failing HSM or a full disk gets a clear 503
// problem that does not leak the cause, changes nothing, and the service
// recovers when the fault clears.
func TestFailingHSMAndFullDisk(t *testing.T) {
	for _, b := range backends {
		t.Run(b, func(t *testing.T) { testFailingHSMAndFullDisk(t, b) })
	}
}

func testFailingHSMAndFullDisk(t *testing.T, backend string) {
	var down, full atomic.Bool
	e := newEnvOn(t, backend,
		func(s kms.Sealer) kms.Sealer { return sealertest.Faulty{Sealer: s, Down: &down} },
		func(s kms.Store) kms.Store { return fullStore{s, &full} }, nil)
	c := e.client(e.admin)
	if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: "sig", Kind: "ml-dsa-65"}); err != nil {
		t.Fatal(err)
	}
	before := e.snapshot()
	check := func(what string, err error) {
		t.Helper()
		var pe *client.Error
		if !errors.As(err, &pe) || pe.Status != http.StatusServiceUnavailable || !strings.HasSuffix(pe.Type, ":unavailable") {
			t.Fatalf("%s: %v, want a 503 unavailable problem", what, err)
		}
		if strings.Contains(pe.Detail, "injected") || strings.Contains(pe.Detail, "/dev/") || strings.Contains(pe.Detail, "/data/") {
			t.Fatalf("%s: the problem leaks the cause: %q", what, pe.Detail)
		}
	}
	down.Store(true)
	_, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: "new", Kind: "ml-dsa-65"})
	check("create with the HSM down", err)
	_, err = c.Rotate(ctx, "sig")
	check("rotate with the HSM down", err)
	_, err = c.Sign(ctx, "sig", []byte("m"), nil)
	check("sign with the HSM down", err)
	check("readyz with the HSM down", c.Ready(ctx))
	down.Store(false)

	full.Store(true)
	_, err = c.CreateKey(ctx, client.CreateKeyRequest{Name: "new", Kind: "ml-dsa-65"})
	check("create on a full disk", err)
	_, err = c.Rotate(ctx, "sig")
	check("rotate on a full disk", err)
	_, err = c.VersionAction(ctx, "sig", 1, "schedule-destroy", 0)
	// version 1 is primary: the refusal comes before the write.
	if !client.IsProblem(err, "failed-precondition") {
		t.Fatalf("schedule-destroy of the primary on a full disk: %v", err)
	}
	_, err = c.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"*"}})
	check("token on a full disk", err)
	full.Store(false)

	if e.snapshot() != before {
		t.Fatal("failed requests changed state")
	}
	if !strings.Contains(e.log.String(), "injected") {
		t.Fatal("the cause is not in the operational log")
	}
	if _, err := c.Rotate(ctx, "sig"); err != nil {
		t.Fatalf("rotate after recovery: %v", err)
	}
	if _, err := c.Sign(ctx, "sig", []byte("m"), nil); err != nil {
		t.Fatalf("sign after recovery: %v", err)
	}
}
