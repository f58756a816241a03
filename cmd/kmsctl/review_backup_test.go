package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestReviewBackupFollowsPartialSymlink: kmsctl backup --out F writes to
// F.partial opened with O_CREATE|O_TRUNC, following a symbolic link:
// whoever can write the backup directory points F.partial at any file the
// operator (often root, from cron) can write, and kmsctl truncates it and
// writes the backup into it.
func TestReviewBackupFollowsPartialSymlink(t *testing.T) {
	url, admin := server(t)
	env := map[string]string{"KMS_URL": url, "KMS_TOKEN": admin}
	backups := t.TempDir()
	victim := filepath.Join(t.TempDir(), "authorized_keys")
	if err := os.WriteFile(victim, []byte("ssh-ed25519 AAAA... operator@host\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(backups, "nightly.kmsbak")
	if err := os.Symlink(victim, out+".partial"); err != nil {
		t.Fatal(err)
	}
	r := kmsctl(t, env, "backup", "--out", out)
	t.Logf("kmsctl backup: exit %d %s %s", r.code, r.stdout, r.stderr)
	b, _ := os.ReadFile(victim)
	if !strings.HasPrefix(string(b), "ssh-ed25519") {
		t.Errorf("the file %s.partial pointed at was overwritten (%d bytes, starts %q)", out, len(b), b[:min(len(b), 16)])
	}
}
