package etcd_test

// An outside review's finding, kept as a regression test: two replicas
// pruning with different views of the marker.

import (
	"context"
	"crypto/rand"
	"fmt"
	"sync"
	"testing"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"

	"github.com/kmsd-project/kmsd/audit"
	"github.com/kmsd-project/kmsd/audit/engine"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/archive"
)

// TestStalePruneKeepsTheMarkersRows: replica A prunes below 512
// (Keep(512) = row 511). Replica B, whose in-memory marker is older (in
// kmsd, a paused former "archive" leader that resumes mid-retain), prunes
// below 300. The store raises B's `below` to the marker (512), and must
// keep Keep(512)'s rows, not Keep(300)'s: row 511 holds the hash of [0,
// 512), which every later checkpoint needs. (It was deleted: no checkpoint
// could be signed again.)
func TestStalePruneKeepsTheMarkersRows(t *testing.T) {
	ctx := context.Background()
	prefix := newPrefix(t)
	a, b := open(t, prefix), open(t, prefix)
	pk, sk, _ := mldsa65.GenerateKey(rand.Reader)
	pub, _ := pk.MarshalBinary()
	sign := func(_ context.Context, msg []byte) ([]byte, error) {
		sig := make([]byte, mldsa65.SignatureSize)
		return sig, mldsa65.SignTo(sk, msg, nil, true, sig)
	}
	la := audit.New(audit.Config{Store: a.Audit(), PublicKey: pub, Sign: sign})
	add := func(s interface{ Audit() *engine.Log }, n int) {
		var wg sync.WaitGroup
		for g := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := g; i < n; i += 8 {
					rec := &kms.AuditRecord{Time: "2026-12-07T00:00:00Z", RequestID: fmt.Sprintf("r%d", i), Actor: "system", Operation: "GET /v1/keys", Status: 200}
					if err := s.Audit().AppendAudit(ctx, rec); err != nil {
						t.Error(err)
						return
					}
				}
			}()
		}
		wg.Wait()
	}
	add(a, 600)
	if _, err := la.Checkpoint(ctx); err != nil {
		t.Fatal(err)
	}
	dir := archive.Dir{Root: t.TempDir()}
	if _, err := (&archive.Writer{Bucket: dir, Store: a.Audit()}).Sync(ctx); err != nil {
		t.Fatal(err)
	}
	a.Audit().SetCold(&archive.Cold{Bucket: dir})
	b.Audit().SetCold(&archive.Cold{Bucket: dir})
	if _, err := a.Audit().Prune(ctx, 512); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Audit().Prune(ctx, 300); err != nil {
		t.Fatal(err)
	}
	if _, err := a.ReadRows(ctx, 511, 512); err != nil {
		t.Errorf("row 511 (kept by Keep(512), the hash of [0,512)) was deleted: %v", err)
	}
	add(a, 10)
	if _, err := la.Checkpoint(ctx); err != nil {
		t.Errorf("no checkpoint can be signed any more: %v", err)
	}
}
