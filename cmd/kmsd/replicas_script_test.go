package main

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/internal/testutil"
)

// freeBase finds a base port whose base+1..base+23 are all free now, away
// from the script's default (8430).
func freeBase(t *testing.T) int {
	t.Helper()
	for range 50 {
		base := 20000 + rand.IntN(20000)
		var lns []net.Listener
		ok := true
		for p := base + 1; p <= base+23; p++ {
			ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
			if err != nil {
				ok = false
				break
			}
			lns = append(lns, ln)
		}
		for _, ln := range lns {
			ln.Close()
		}
		if ok {
			return base
		}
	}
	t.Fatal("no 23 free ports in a row")
	return 0
}

// TestReplicasScriptOnABasePort runs README's deploy/replicas.sh as a user
// does, on a base port other than its default: it says which ports it
// uses, the three replicas answer there and share one store (a key made
// on the first is served by the others), and Ctrl-C stops everything it
// started.
func TestReplicasScriptOnABasePort(t *testing.T) {
	base := freeBase(t)
	dir := filepath.Join(t.TempDir(), "replicas")
	cmd := exec.Command("../../deploy/replicas.sh", dir)
	cmd.Env = append(os.Environ(), fmt.Sprintf("KMSD_REPLICAS_BASE_PORT=%d", base))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var out testutil.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() { syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) })
	deadline := time.After(4 * time.Minute)
	for !strings.Contains(out.String(), "three replicas:") {
		select {
		case err := <-done:
			t.Fatalf("replicas.sh exited before the replicas were up: %v\n%s", err, out.String())
		case <-deadline:
			t.Fatalf("replicas.sh: no replicas within 4 minutes\n%s", out.String())
		case <-time.After(200 * time.Millisecond):
		}
	}
	wantPorts := fmt.Sprintf("ports: replicas %d-%d, versitygw %d, etcd clients %d-%d, etcd peers %d-%d", base+1, base+3, base+4, base+11, base+13, base+21, base+23)
	if !strings.Contains(out.String(), wantPorts) {
		t.Fatalf("replicas.sh did not say its ports (%q):\n%s", wantPorts, out.String())
	}
	kmsctl := func(i int, args ...string) (string, error) {
		c := exec.Command(kmsctlBin, append([]string{"-o", "json"}, args...)...)
		c.Env = append(os.Environ(),
			fmt.Sprintf("KMS_URL=https://127.0.0.1:%d", base+i),
			"KMS_CA_CERT="+filepath.Join(dir, fmt.Sprintf("kmsd-%d", i), "tls", "ca.pem"),
			"KMS_TOKEN_FILE="+filepath.Join(dir, "kmsd-1", "admin.token"))
		b, err := c.CombinedOutput()
		return string(b), err
	}
	if o, err := kmsctl(1, "keys", "create", "script-replicas", "--kind", "ml-dsa-65"); err != nil {
		t.Fatalf("create on replica 1: %v\n%s", err, o)
	}
	for _, i := range []int{2, 3} {
		o, err := kmsctl(i, "keys", "show", "script-replicas")
		if err != nil || !strings.Contains(o, `"ml-dsa-65"`) {
			t.Fatalf("replica %d does not serve the key made on replica 1: %v\n%s", i, err, o)
		}
	}
	// Ctrl-C: the script and everything it started stop.
	syscall.Kill(-cmd.Process.Pid, syscall.SIGINT)
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatalf("replicas.sh still running 30 s after Ctrl-C\n%s", out.String())
	}
	for p := base + 1; p <= base+4; p++ {
		if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", p), time.Second); err == nil {
			c.Close()
			t.Errorf("port %d still answers after Ctrl-C", p)
		}
	}
}
