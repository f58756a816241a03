package main

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestDataDirRelativeThenMoved: a data dir made with a relative
// --data-dir (README's ./deploy/start.sh does so) keeps its embedded
// SoftHSM token when kmsd starts from another working directory, and when
// the data dir is moved (a new disk, a restored copy): the token directory
// is where the data dir is, whatever path kmsd first wrote into
// softhsm2.conf. Before, softhsm2.conf kept the path as first given, and
// the next start from elsewhere found no token (kmsd refused to start:
// "no token labelled kmsd ... moved or deleted?").
func TestDataDirRelativeThenMoved(t *testing.T) {
	work := t.TempDir()
	p := startIn(t, work, "data", freeAddr(t), nil)
	p.waitReady(t)
	id := p.identity(t)
	p.cmd.Process.Signal(syscall.SIGTERM)
	p.wait(t, 20*time.Second)
	conf, _ := os.ReadFile(filepath.Join(work, "data", "softhsm", "softhsm2.conf"))
	for _, line := range strings.Split(string(conf), "\n") {
		if v, ok := strings.CutPrefix(line, "directories.tokendir = "); ok && !filepath.IsAbs(v) {
			t.Errorf("softhsm2.conf names the token directory by a relative path: %q", v)
		}
	}
	// The same data dir, moved, from another working directory.
	moved := filepath.Join(t.TempDir(), "moved")
	if err := os.Rename(filepath.Join(work, "data"), moved); err != nil {
		t.Fatal(err)
	}
	q := startIn(t, t.TempDir(), moved, freeAddr(t), nil)
	q.waitReady(t)
	if string(q.identity(t)) != string(id) {
		t.Fatal("the moved data dir serves another identity key")
	}
}
