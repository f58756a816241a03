package audit_test

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strings"
	"testing"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
	"golang.org/x/mod/sumdb/tlog"

	"github.com/kmsd-project/kmsd/audit"
	"github.com/kmsd-project/kmsd/kms"
)

// reviewLog builds a canonical, chained log in memory and signs
// checkpoints of it, as kmsd does.
type reviewLog struct {
	t       *testing.T
	pub     []byte
	sk      *mldsa65.PrivateKey
	records [][]byte
	tree    *audit.MemoryTree
}

func newReviewLog(t *testing.T) *reviewLog {
	pk, sk, _ := mldsa65.GenerateKey(rand.Reader)
	pub, _ := pk.MarshalBinary()
	return &reviewLog{t: t, pub: pub, sk: sk, tree: &audit.MemoryTree{}}
}

func (l *reviewLog) clone() *reviewLog {
	c := &reviewLog{t: l.t, pub: l.pub, sk: l.sk, tree: &audit.MemoryTree{}}
	for _, r := range l.records {
		c.records = append(c.records, r)
		c.tree.Append(r)
	}
	return c
}

func (l *reviewLog) truncate(n int) *reviewLog {
	c := &reviewLog{t: l.t, pub: l.pub, sk: l.sk, tree: &audit.MemoryTree{}}
	for _, r := range l.records[:n] {
		c.records = append(c.records, r)
		c.tree.Append(r)
	}
	return c
}

func (l *reviewLog) add(r *kms.AuditRecord) {
	i := uint64(len(l.records))
	r.Index = i
	if i > 0 {
		h := l.tree.Leaf(i - 1)
		r.PrevHash = hex.EncodeToString(h[:])
	}
	b := r.Encode()
	l.records = append(l.records, b)
	if err := l.tree.Append(b); err != nil {
		l.t.Fatal(err)
	}
}

func (l *reviewLog) op(what string) {
	l.add(&kms.AuditRecord{Time: "2026-11-23T00:00:00Z", Actor: "0123456789abcdef", Role: "admin", Operation: what, Status: 200})
}

func (l *reviewLog) checkpoint() []byte {
	n := uint64(len(l.records))
	root, err := l.tree.Root(n)
	if err != nil {
		l.t.Fatal(err)
	}
	msg, err := audit.SignCheckpoint(audit.Checkpoint{Origin: audit.Origin(l.pub), Size: n, Root: root},
		audit.NewNoteSigner(l.pub, func(m []byte) ([]byte, error) {
			sig := make([]byte, mldsa65.SignatureSize)
			return sig, mldsa65.SignTo(l.sk, m, nil, true, sig)
		}))
	if err != nil {
		l.t.Fatal(err)
	}
	return msg
}

var _ = tlog.Hash{}

// TestReviewOldRestoreExcusesLaterRollback: a log that was restored once
// (an intended restore, re-pinned after) is later rolled back, or forked,
// by whoever can put back an earlier copy of the store. The verifier must
// say rollback / fork; it says "rolled back by a restore" and names the
// old, already accepted restore.
func TestReviewOldRestoreExcusesLaterRollback(t *testing.T) {
	l := newReviewLog(t)
	for i := 0; i < 5; i++ {
		l.op(fmt.Sprintf("POST /v1/keys/{name}/rotate #%d", i))
	}
	// An intended restore long ago: backup of 5 records.
	l.add(&kms.AuditRecord{Time: "2026-01-01T00:00:00Z", Actor: "system", Operation: kms.RestoreOp, Status: 200,
		Restore: &kms.RestoreInfo{Backup: "aa", BackupSize: 5, Created: "2025-12-31T00:00:00Z"}})
	for i := 0; i < 10; i++ {
		l.op(fmt.Sprintf("PATCH /v1/keys/{name} #%d", i))
	}
	cp16 := l.checkpoint() // the auditor re-pinned after the restore
	for i := 0; i < 10; i++ {
		l.op(fmt.Sprintf("DELETE /v1/tokens/{id} #%d", i))
	}
	saved := l.checkpoint() // pinned later: size 26

	// 1. Rollback: the store put back as of size 16 (its checkpoint is genuine).
	rolled := l.truncate(16)
	_, _, err := audit.Verify(l.pub, rolled.records, [][]byte{cp16}, saved)
	t.Logf("rollback: %v", err)
	if p, ok := err.(*audit.Problem); !ok || p.Check != "rollback" {
		t.Errorf("a rollback of the store to size 16 (no restore since the pinned checkpoint) reported as %v", err)
	}

	// 2. Fork: rolled back to 16, then kmsd goes on and signs past 26.
	fork := l.truncate(16)
	for i := 0; i < 15; i++ {
		fork.op(fmt.Sprintf("GET /v1/keys #%d", i))
	}
	_, _, err = audit.Verify(l.pub, fork.records, [][]byte{fork.checkpoint()}, saved)
	t.Logf("fork: %v", err)
	if p, ok := err.(*audit.Problem); !ok || p.Check != "root" {
		t.Errorf("a fork at 16 of the pinned log of 26 reported as %v", err)
	}

	// 3. Records never checked: a log with no restore at all, rolled back,
	// and one record inside the checkpoint edited into a restore record.
	m := newReviewLog(t)
	for i := 0; i < 10; i++ {
		m.op("POST /v1/keys")
	}
	cp10 := m.checkpoint()
	for i := 0; i < 10; i++ {
		m.op("POST /v1/keys")
	}
	saved20 := m.checkpoint()
	edited := m.truncate(10).records
	fake := &kms.AuditRecord{Index: 3, Time: "2026-01-01T00:00:00Z", Actor: "system", Operation: kms.RestoreOp, Status: 200,
		Restore: &kms.RestoreInfo{Backup: "made-up", BackupSize: 3, Created: "2026-01-01T00:00:00Z"}}
	edited[3] = fake.Encode()
	_, _, err = audit.Verify(m.pub, edited, [][]byte{cp10}, saved20)
	t.Logf("edited: %v", err)
	if p, ok := err.(*audit.Problem); !ok || p.Check == "restored" || strings.Contains(err.Error(), "rolled back by a restore") {
		t.Errorf("a rolled-back log with record 3 edited (it no longer hashes to its checkpoint) reported as %v", err)
	}
}

// TestRestoredOnlyWhenStateDoesNotKnowIt: a genuine restore after the
// checkpoint was saved (the saved state lists no restore) is reported as
// "restored", with the sizes; the same log against a saved state that
// lists that restore (it was saved after it) is a rollback.
func TestRestoredOnlyWhenStateDoesNotKnowIt(t *testing.T) {
	l := newReviewLog(t)
	for i := 0; i < 12; i++ {
		l.op(fmt.Sprintf("POST /v1/keys #%d", i))
	}
	saved := l.checkpoint() // 12, saved by the auditor
	restored := l.truncate(7)
	restored.add(&kms.AuditRecord{Time: "2026-12-01T00:00:00Z", Actor: "system", Operation: kms.RestoreOp, Status: 200,
		Restore: &kms.RestoreInfo{Backup: "b7", BackupSize: 7, Created: "2026-11-30T00:00:00Z"}})
	for i := 0; i < 2; i++ {
		restored.op("GET /v1/keys")
	}
	cp := restored.checkpoint() // 10
	_, _, err := audit.VerifySaved(l.pub, restored.records, [][]byte{cp}, saved, &audit.SavedState{})
	if p, ok := err.(*audit.Problem); !ok || p.Check != "restored" || !strings.Contains(err.Error(), "b7") || !strings.Contains(err.Error(), "covers 12 records") {
		t.Fatalf("a restore after the saved checkpoint: %v", err)
	}
	_, _, err = audit.VerifySaved(l.pub, restored.records, [][]byte{cp}, saved, &audit.SavedState{Restores: []uint64{7}})
	if p, ok := err.(*audit.Problem); !ok || p.Check != "rollback" {
		t.Fatalf("a restore the saved state knew: %v", err)
	}
	_, _, err = audit.Verify(l.pub, restored.records, [][]byte{cp}, saved)
	if p, ok := err.(*audit.Problem); !ok || p.Check != "rollback" || !strings.Contains(err.Error(), "restore record at 7") {
		t.Fatalf("without a saved state: %v", err)
	}
}
