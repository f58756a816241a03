package audit_test

import (
	"fmt"
	"testing"

	"github.com/kmsd-project/kmsd/audit"
	"github.com/kmsd-project/kmsd/kms"
)

func (l *reviewLog) restore(backup string, kept uint64, at string) {
	l.add(&kms.AuditRecord{Time: at, Actor: "system", Operation: kms.RestoreOp, Status: 200,
		Restore: &kms.RestoreInfo{Backup: backup, BackupSize: kept, Created: "2025-01-01T00:00:00Z"}})
}

func (l *reviewLog) ops(n int, what string) {
	for i := 0; i < n; i++ {
		l.op(fmt.Sprintf("%s #%d", what, i))
	}
}

// TestReview2PutBackAcrossTwoRestoresIsRestored: FILE.restores lists the
// indexes of the restore records the saved log held; a log from another
// branch of the history can hold an old restore at an index the saved
// log never had. Here restore R0 (long ago, intended) is at index 10;
// a later restore R1 went back to a backup of 7 records, so the log the
// auditor saved (size 20, restores {7}) does not hold index 10. Whoever
// kept a copy of the store from before R1 puts it back: the verifier
// calls this rollback "rolled back by a restore" and names R0, an old,
// intended restore (the F3 pattern).
func TestReview2PutBackAcrossTwoRestoresIsRestored(t *testing.T) {
	h0 := newReviewLog(t)
	h0.ops(10, "POST /v1/keys")
	h0.restore("r0-backup", 10, "2025-06-01T00:00:00Z") // R0 at 10
	h0.ops(4, "DELETE /v1/tokens/{id}")
	copy15 := h0.clone()
	cp15 := copy15.checkpoint() // the attacker's copy of the store, size 15

	h1 := h0.truncate(7)
	h1.restore("r1-backup", 7, "2026-01-01T00:00:00Z") // R1 at 7
	h1.ops(12, "PATCH /v1/keys/{name}")
	saved := h1.checkpoint()        // the auditor's, size 20
	st := audit.StateOf(h1.records) // as kmsctl audit verify --save-checkpoint keeps it
	state := &st
	t.Logf("saved checkpoint: size %d, restores %v", len(h1.records), state.Restores)

	_, _, err := audit.VerifySaved(h0.pub, copy15.records, [][]byte{cp15}, saved, state)
	t.Logf("put-back of the pre-R1 copy: %v", err)
	if p, ok := err.(*audit.Problem); !ok || p.Check == "restored" {
		t.Errorf("a put-back of an old copy of the store is reported as %q (naming restore R0 of 2025, which the saved log never held at that index)", p.Check)
	}
}

// TestReview2GenuineRestoreHiddenByLaterOne: explainSaved weighs only the
// newest restore record. Two restores after the checkpoint was saved:
// R1 rolled the log back past it, R2 (from a later backup, of more
// records than the saved checkpoint covers) came after. R1 explains the
// fork; the verifier reports a fork.
func TestReview2GenuineRestoreHiddenByLaterOne(t *testing.T) {
	l := newReviewLog(t)
	l.ops(12, "POST /v1/keys")
	saved := l.checkpoint() // 12, no restore
	r := l.truncate(7)
	r.restore("r1", 7, "2026-02-01T00:00:00Z") // R1 at 7, after the save
	r.ops(10, "GET /v1/keys")
	r2 := r.truncate(15) // a backup of 15 records of the restored log
	r2.restore("r2", 15, "2026-02-02T00:00:00Z")
	r2.ops(2, "GET /v1/keys")
	_, _, err := audit.VerifySaved(l.pub, r2.records, [][]byte{r2.checkpoint()}, saved, &audit.SavedState{})
	t.Logf("two restores since the save: %v", err)
	if p, ok := err.(*audit.Problem); !ok || p.Check != "restored" {
		t.Errorf("a log restored twice since the checkpoint was saved (R1 went back past it) is reported as %v", err)
	}
}
