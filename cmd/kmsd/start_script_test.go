package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/internal/testutil"
)

// TestStartScript runs README's first command, deploy/start.sh, as a new
// user does (on a fresh data dir, on another port): it says what it is
// doing at each step, kmsd comes up on the embedded default, and Ctrl-C
// stops it.
func TestStartScript(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	addr := freeAddr(t)
	cmd := exec.Command("../../deploy/start.sh", "--addr", addr)
	cmd.Env = append(os.Environ(), "KMS_DATA_DIR="+data, "SOFTHSM2_CONF=/nonexistent")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.WaitDelay = 5 * time.Second
	var out testutil.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) })
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	p := &proc{addr: addr, dataDir: data, stderr: &out, done: done, cmd: cmd}
	deadline := time.Now().Add(4 * time.Minute)
	for {
		if c, err := p.client(t, ""); err == nil {
			if err := c.Ready(t.Context()); err == nil {
				break
			}
		}
		select {
		case err := <-done:
			t.Fatalf("start.sh exited: %v\n%s", err, out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("kmsd from start.sh not ready within 4 minutes:\n%s", out.String())
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, step := range []string{
		"start.sh: checking what kmsd needs",
		"start.sh: downloading the Go modules",
		"start.sh: building bin/kmsd",
		"start.sh: first start on " + data,
		"start.sh: starting kmsd in the foreground (Ctrl-C stops it)",
	} {
		if !strings.Contains(out.String(), step) {
			t.Errorf("start.sh did not say %q:\n%s", step, out.String())
		}
	}
	if _, err := os.Stat(filepath.Join(data, "admin.token")); err != nil {
		t.Errorf("no admin token on the first start: %v", err)
	}
	syscall.Kill(-cmd.Process.Pid, syscall.SIGINT)
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatalf("kmsd from start.sh still running 30 s after Ctrl-C:\n%s", out.String())
	}
}
