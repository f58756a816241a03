package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/store/archive"
)

// TestReviewHalfRestoreRevivesRevokedToken: kmsd restore renames the
// loaded store into place (bbolt; on etcd it removes the 'restoring'
// mark) before it reads the log back from the archive, appends the
// restore record and revokes again the tokens revoked after the backup.
// When that second half fails (here: the archive lost an entry bundle;
// equally a kill -9 at that point), the data dir holds a kms.db that
// kmsd starts on: without a restore record, and with the token revoked
// after the backup working again.
func TestReviewHalfRestoreRevivesRevokedToken(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	arch := filepath.Join(t.TempDir(), "archive")
	files := t.TempDir()
	args := []string{"--audit-archive", arch, "--audit-checkpoint-interval", "100ms", "--audit-checkpoint-every", "16"}
	p := start(t, dir, args...)
	p.waitReady(t)
	c := adminClient(t, p, dir)
	if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: "kept", Kind: "ml-dsa-65"}); err != nil {
		t.Fatal(err)
	}
	old, err := c.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"kept"}})
	if err != nil {
		t.Fatal(err)
	}
	b := filepath.Join(files, "b.kmsbak")
	if out, code := kmsctlOn(t, p, dir, "backup", "--out", b); code != 0 {
		t.Fatalf("backup: %d %s", code, out)
	}
	// The credential leaks; the admin revokes it.
	if _, err := c.RevokeToken(ctx, old.ID); err != nil {
		t.Fatal(err)
	}
	for range 300 {
		if _, err := c.GetKey(ctx, "kept"); err != nil {
			t.Fatal(err)
		}
	}
	cp, err := c.AuditCheckpoint(ctx)
	if err != nil {
		t.Fatal(err)
	}
	n, _ := archive.CheckpointSize(cp)
	waitArchived(t, p, arch, n)
	stopProc(t, p)
	os.Remove(filepath.Join(dir, "kms.db"))
	os.Remove(filepath.Join(dir, "kms.db-audit-wal"))
	// The archive loses its entry bundles (or kmsd restore is killed
	// after the rename): the read back fails.
	if err := os.RemoveAll(filepath.Join(arch, "tile", "entries")); err != nil {
		t.Fatal(err)
	}
	out, errs, code := restoreCmd(t, nil, append([]string{"--data-dir", dir, "--from", b}, args...)...)
	t.Logf("restore: exit %d\n%s\n%s", code, out, errs)
	if code == 0 {
		t.Fatal("restore succeeded without the archive's bundles")
	}
	if _, err := os.Stat(filepath.Join(dir, "kms.db")); err != nil {
		t.Skipf("the failed restore left no kms.db: %v", err)
	}
	// The operator starts kmsd (without the archive that failed).
	q := start(t, dir)
	if !readyOrExit(t, q) {
		t.Logf("kmsd refused the half-restored data dir:\n%s", q.stderr.String())
		return
	}
	defer stopProc(t, q)
	oc, err := q.client(t, old.Token)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := oc.GetKey(ctx, "kept"); client.StatusOf(err) != 401 {
		t.Errorf("kmsd started on what the failed restore left, and the token revoked after the backup works again (GetKey: %v)", err)
	}
	if strings.Contains(q.stderr.String(), "restore") {
		t.Logf("kmsd says: %s", q.stderr.String())
	}
}
