package etcd_test

import (
	"bytes"
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
	"github.com/kmsd-project/kmsd/store/etcd"
)

// auditFixture is an identity key and a checkpoint signer over the audit
// log of s, and add, which appends n records to a replica's log from
// several goroutines (so that they group-commit).
func auditFixture(t *testing.T, s *etcd.Store) (pub []byte, log *audit.Log, add func(interface{ Audit() *engine.Log }, int)) {
	pk, sk, _ := mldsa65.GenerateKey(rand.Reader)
	pub, _ = pk.MarshalBinary()
	sign := func(_ context.Context, msg []byte) ([]byte, error) {
		sig := make([]byte, mldsa65.SignatureSize)
		return sig, mldsa65.SignTo(sk, msg, nil, true, sig)
	}
	add = func(r interface{ Audit() *engine.Log }, n int) {
		var wg sync.WaitGroup
		for g := range 16 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := g; i < n; i += 16 {
					rec := &kms.AuditRecord{Time: "2026-12-07T00:00:00Z", RequestID: fmt.Sprintf("r%d", i), Actor: "system", Operation: "GET /v1/keys", Status: 200}
					if err := r.Audit().AppendAudit(context.Background(), rec); err != nil {
						t.Error(err)
						return
					}
				}
			}()
		}
		wg.Wait()
	}
	return pub, audit.New(audit.Config{Store: s.Audit(), PublicKey: pub, Sign: sign}), add
}

// TestPruneToTheArchive: one replica prunes the audit log's rows to the
// archive; another replica, which has not heard of it, reads the pruned
// records from the archive all the same; both stores scrub clean (the
// marker is digested); the log goes on and verifies whole.
func TestPruneToTheArchive(t *testing.T) {
	ctx := context.Background()
	prefix := newPrefix(t)
	a, b := open(t, prefix), open(t, prefix)
	pub, la, add := auditFixture(t, a)
	add(a, 600)
	if _, err := la.Checkpoint(ctx); err != nil {
		t.Fatal(err)
	}
	dir := archive.Dir{Root: t.TempDir()}
	if n, err := (&archive.Writer{Bucket: dir, Store: a.Audit()}).Sync(ctx); err != nil || n != 600 {
		t.Fatalf("archive: %d %v", n, err)
	}
	before, err := b.Audit().AuditRecords(ctx, 0, 600)
	if err != nil {
		t.Fatal(err)
	}
	a.Audit().SetCold(&archive.Cold{Bucket: dir})
	b.Audit().SetCold(&archive.Cold{Bucket: dir})
	n, err := a.Audit().Prune(ctx, 500)
	if err != nil || n != 500-6 {
		t.Fatalf("prune below 500: %d rows, %v (want 494: six kept)", n, err)
	}
	after, err := b.Audit().AuditRecords(ctx, 0, 600)
	if err != nil {
		t.Fatalf("the other replica reads the pruned records: %v", err)
	}
	for i := range before {
		if !bytes.Equal(before[i], after[i]) {
			t.Fatalf("record %d reads otherwise on the other replica", i)
		}
	}
	if _, err := a.ReadRows(ctx, 0, 1); err == nil {
		t.Fatal("row 0 is still in etcd")
	}
	if rows, err := a.ReadRows(ctx, 499, 500); err != nil || len(rows) != 1 {
		t.Fatalf("row 499 (kept): %v", err)
	}
	if _, err := a.Scrub(ctx); err != nil {
		t.Fatalf("scrub after pruning: %v", err)
	}
	if _, err := b.Scrub(ctx); err != nil {
		t.Fatalf("scrub on the other replica: %v", err)
	}
	add(b, 100)
	if _, err := la.Checkpoint(ctx); err != nil {
		t.Fatal(err)
	}
	recs, err := b.Audit().AuditRecords(ctx, 0, 700)
	if err != nil {
		t.Fatal(err)
	}
	_, note, err := a.LatestCheckpoint(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if res, _, err := audit.Verify(pub, recs, [][]byte{note}, nil); err != nil || res.Size != 700 {
		t.Fatalf("verify after pruning: %v %v", res, err)
	}
}

// An outside review's finding: two replicas pruning with different
// views of the marker.

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
	_, la, add := auditFixture(t, a)
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
