package engine_test

import (
	"path/filepath"
	"testing"
)

// TestJournalUsesAIO: where the kernel has native AIO, the journal's
// flushes go through it.
func TestJournalUsesAIO(t *testing.T) {
	s := openTest(t, filepath.Join(t.TempDir(), "kms.db"), 0)
	if !s.Audit().JournalUsesAIO() {
		t.Fatal("the WAL does not use native AIO")
	}
	if err := s.Audit().AppendAudit(ctx, testRec("r")); err != nil || s.Audit().JournalSyncs() != 1 {
		t.Fatalf("append through AIO: %v, %d WAL syncs", err, s.Audit().JournalSyncs())
	}
}
