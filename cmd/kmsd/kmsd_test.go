package main

import (
	"bytes"
	"context"
	"crypto/mlkem"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/hsm"
	"github.com/kmsd-project/kmsd/hsm/softhsm"
	"github.com/kmsd-project/kmsd/internal/testutil"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/bolt"
)

// These tests run the real kmsd binary: embedded SoftHSM token, bbolt file,
// HTTP on 127.0.0.1.

var kmsdBin, kmsctlBin, mcpBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "kmsd-bin-")
	if err != nil {
		panic(err)
	}
	kmsdBin = filepath.Join(dir, "kmsd")
	out, err := exec.Command("go", "build", "-o", kmsdBin, ".").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build kmsd: %v\n%s", err, out)
		os.Exit(1)
	}
	kmsctlBin = filepath.Join(dir, "kmsctl")
	if out, err := exec.Command("go", "build", "-o", kmsctlBin, "../kmsctl").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build kmsctl: %v\n%s", err, out)
		os.Exit(1)
	}
	mcpBin = filepath.Join(dir, "kmsd-mcp")
	if out, err := exec.Command("go", "build", "-o", mcpBin, "../kmsd-mcp").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build kmsd-mcp: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

type proc struct {
	cmd     *exec.Cmd
	addr    string
	dataDir string
	plain   bool // started with --insecure-http
	stderr  *testutil.Buffer
	done    chan error
}

// url is kmsd's base URL: https unless started with --insecure-http.
func (p *proc) url() string {
	if p.plain {
		return "http://" + p.addr
	}
	return "https://" + p.addr
}

// client is a client for p with token, trusting the local CA kmsd made
// under its data dir.
func (p *proc) client(t testing.TB, token string) (*client.Client, error) {
	t.Helper()
	if p.plain {
		return client.New(p.url(), token)
	}
	cfg, err := client.TLSConfig(filepath.Join(p.dataDir, "tls", "ca.pem"), "", "")
	if err != nil {
		return nil, err
	}
	return client.New(p.url(), token, client.WithTLS(cfg))
}

func freeAddr(t testing.TB) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// start runs kmsd and returns at once; use waitReady or wait.
func start(t *testing.T, dataDir string, args ...string) *proc {
	t.Helper()
	return startEnv(t, dataDir, nil, args...)
}

// startEnv is start with more environment (env wins over the test's own).
func startEnv(t *testing.T, dataDir string, env []string, args ...string) *proc {
	t.Helper()
	p := startAt(t, dataDir, freeAddr(t), env, args...)
	p.plain = slices.Contains(args, "--insecure-http")
	return p
}

// identity is the ML-DSA-65 identity public key p serves.
func (p *proc) identity(t testing.TB) []byte {
	t.Helper()
	c, err := p.client(t, "")
	if err != nil {
		t.Fatal(err)
	}
	id, err := c.Identity(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return id.PublicKey
}

// startAt is startEnv on a given address.
func startAt(t testing.TB, dataDir, addr string, env []string, args ...string) *proc {
	t.Helper()
	return startIn(t, "", dataDir, addr, env, args...)
}

// startIn is startAt in working directory cwd ("": the test's).
func startIn(t testing.TB, cwd, dataDir, addr string, env []string, args ...string) *proc {
	t.Helper()
	p := &proc{addr: addr, dataDir: dataDir, stderr: &testutil.Buffer{}, done: make(chan error, 1)}
	if cwd != "" && !filepath.IsAbs(dataDir) {
		p.dataDir = filepath.Join(cwd, dataDir) // for the test's own reads
	}
	p.cmd = exec.Command(kmsdBin, append([]string{"--data-dir", dataDir, "--addr", p.addr}, args...)...)
	p.cmd.Dir = cwd
	p.cmd.Env = append(append(os.Environ(), "SOFTHSM2_CONF=/nonexistent"), env...) // kmsd must set its own, unless env says
	p.cmd.Stderr = p.stderr
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.done
	})
	return p
}

func (p *proc) waitReady(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case err := <-p.done:
			p.done <- err
			t.Fatalf("kmsd exited: %v\n%s", err, p.stderr.String())
		default:
		}
		// The CA file appears once kmsd made it.
		if c, err := p.client(t, ""); err == nil && c.Ready(context.Background()) == nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("kmsd not ready in time\n%s", p.stderr.String())
}

// wait returns the exit code once kmsd ends.
func (p *proc) wait(t testing.TB, limit time.Duration) int {
	t.Helper()
	select {
	case err := <-p.done:
		p.done <- err
		if err == nil {
			return 0
		}
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode()
		}
		t.Fatal(err)
	case <-time.After(limit):
		t.Fatalf("kmsd still running after %v\n%s", limit, p.stderr.String())
	}
	return -1
}

func adminClient(t *testing.T, p *proc, dataDir string) *client.Client {
	t.Helper()
	tok, err := os.ReadFile(filepath.Join(dataDir, "admin.token"))
	if err != nil {
		t.Fatal(err)
	}
	c, err := p.client(t, strings.TrimSpace(string(tok)))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

var ctx = context.Background()

func TestFirstStartAndRestart(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	p := start(t, dir)
	p.waitReady(t)
	fi, err := os.Stat(filepath.Join(dir, "admin.token"))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("admin.token: %v %v", fi, err)
	}
	for _, f := range []string{"softhsm/softhsm2.conf", "softhsm/pin", "kms.db"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
	}
	c := adminClient(t, p, dir)
	id1, err := c.Identity(ctx)
	if err != nil || id1.Version != 1 {
		t.Fatal(err)
	}
	if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: "k", Kind: "ml-dsa-65"}); err != nil {
		t.Fatal(err)
	}
	sig, err := c.Sign(ctx, "k", []byte("m"), nil)
	if err != nil {
		t.Fatal(err)
	}
	tok, _ := os.ReadFile(filepath.Join(dir, "admin.token"))
	pin, _ := softhsm.ReadPIN(filepath.Join(dir, "softhsm/pin"))
	p.cmd.Process.Signal(syscall.SIGTERM)
	if code := p.wait(t, 15*time.Second); code != 0 {
		t.Fatalf("exit %d after SIGTERM\n%s", code, p.stderr.String())
	}
	log := p.stderr.String()
	if strings.Contains(log, strings.TrimSpace(string(tok))) || strings.Contains(log, pin) {
		t.Fatal("the log holds the admin token or the PIN")
	}
	if !strings.Contains(log, filepath.Join(dir, "admin.token")) || !strings.Contains(log, `"msg":"stopped"`) {
		t.Fatalf("the log lacks the admin token path or the stop: %s", log)
	}

	// Restart: same identity, same token, the key still signs and verifies.
	p2 := start(t, dir)
	p2.waitReady(t)
	c2 := adminClient(t, p2, dir)
	id2, err := c2.Identity(ctx)
	if err != nil || !bytes.Equal(id1.PublicKey, id2.PublicKey) {
		t.Fatalf("identity changed across restart: %v", err)
	}
	if ok, err := c2.Verify(ctx, "k", 1, []byte("m"), sig.Signature, nil); !ok || err != nil {
		t.Fatalf("verify after restart: %v %v", ok, err)
	}
	if _, err := c2.Sign(ctx, "k", []byte("m"), nil); err != nil {
		t.Fatalf("sign after restart: %v", err)
	}
	tok2, _ := os.ReadFile(filepath.Join(dir, "admin.token"))
	if !bytes.Equal(tok, tok2) {
		t.Fatal("the admin token was replaced on restart")
	}
}

func TestSecondInstanceFailsFast(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	p := start(t, dir)
	p.waitReady(t)
	q := start(t, dir)
	if code := q.wait(t, 10*time.Second); code == 0 {
		t.Fatal("a second kmsd on the same data dir started")
	}
	if !strings.Contains(q.stderr.String(), "another kmsd") {
		t.Fatalf("unclear message: %s", q.stderr.String())
	}
}

// TestHSMFaultsStopStartup: a missing module, a missing token or a wrong PIN
// stops kmsd before it listens, with one line naming the cause and not the
// PIN.
func TestHSMFaultsStopStartup(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	p := start(t, dir)
	p.waitReady(t)
	p.cmd.Process.Signal(syscall.SIGTERM)
	p.wait(t, 15*time.Second)
	mod, err := softhsm.FindModule()
	if err != nil {
		t.Fatal(err)
	}
	pin, _ := softhsm.ReadPIN(filepath.Join(dir, "softhsm/pin"))
	wrong := filepath.Join(t.TempDir(), "wrong-pin")
	os.WriteFile(wrong, []byte("0000wrongpin0000\n"), 0o600)
	conf := "SOFTHSM2_CONF=" + filepath.Join(dir, "softhsm/softhsm2.conf")
	cases := []struct {
		name string
		args []string
		env  string
		want string
	}{
		{"missing module", []string{"--pkcs11-module", "/nonexistent/libnope.so", "--pkcs11-pin-file", wrong}, "", "cannot load the PKCS#11 module /nonexistent/libnope.so"},
		{"other token", []string{"--pkcs11-module", mod, "--pkcs11-token", "nosuch", "--pkcs11-pin-file", filepath.Join(dir, "softhsm/pin")}, conf, `sealed under the key labelled "kmsd-kek" in token "kmsd"`},
		{"wrong PIN", []string{"--pkcs11-module", mod, "--pkcs11-pin-file", wrong}, conf, "refused the PIN"},
		{"no PIN", []string{"--pkcs11-module", mod}, conf, "no PIN"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			q := &proc{addr: freeAddr(t), stderr: &testutil.Buffer{}, done: make(chan error, 1)}
			q.cmd = exec.Command(kmsdBin, append([]string{"--data-dir", dir, "--addr", q.addr}, c.args...)...)
			q.cmd.Env = append(os.Environ(), c.env)
			q.cmd.Stderr = q.stderr
			if err := q.cmd.Start(); err != nil {
				t.Fatal(err)
			}
			go func() { q.done <- q.cmd.Wait() }()
			if code := q.wait(t, 15*time.Second); code != 1 {
				t.Fatalf("exit code %d, want 1", code)
			}
			out := q.stderr.String()
			last := strings.TrimSpace(out[strings.LastIndex(strings.TrimRight(out, "\n"), "\n")+1:])
			if !strings.HasPrefix(last, "kmsd: ") || !strings.Contains(last, c.want) {
				t.Fatalf("last line %q does not name %q", last, c.want)
			}
			if strings.Contains(out, pin) || strings.Contains(out, "0000wrongpin0000") {
				t.Fatal("the output names a PIN")
			}
			if conn, err := net.Dial("tcp", q.addr); err == nil {
				conn.Close()
				t.Fatal("kmsd listened")
			}
		})
	}
}

// TestCrashSafety kills kmsd with SIGKILL during a loop of creates and
// rotations, many times. After each kill the bbolt file checks clean, and
// after each restart every acknowledged version exists and decapsulates.
func TestCrashSafety(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	type ack struct {
		name    string
		version uint64
	}
	var acked []ack
	rounds := 8
	var sl kms.Sealer
	for round := 0; round < rounds; round++ {
		p := start(t, dir)
		p.waitReady(t)
		c := adminClient(t, p, dir)
		// Every version acknowledged before still works.
		for _, a := range acked {
			pub, err := c.PublicKey(ctx, a.name, a.version)
			if err != nil {
				t.Fatalf("round %d: acknowledged %s v%d: %v", round, a.name, a.version, err)
			}
			ek, err := mlkem.NewEncapsulationKey768(pub.PublicKey)
			if err != nil {
				t.Fatal(err)
			}
			ss, ct := ek.Encapsulate()
			got, err := c.Decapsulate(ctx, a.name, a.version, ct)
			if err != nil || !bytes.Equal(got.SharedSecret, ss) {
				t.Fatalf("round %d: %s v%d does not decapsulate: %v", round, a.name, a.version, err)
			}
		}
		var mu sync.Mutex
		var wg sync.WaitGroup
		for w := 0; w < 2; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				for i := 0; ; i++ {
					name := fmt.Sprintf("r%d-w%d-%d", round, w, i)
					if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: name, Kind: "ml-kem-768"}); err != nil {
						return // killed
					}
					mu.Lock()
					acked = append(acked, ack{name, 1})
					mu.Unlock()
					v, err := c.Rotate(ctx, name)
					if err != nil {
						return
					}
					mu.Lock()
					acked = append(acked, ack{name, v.Version})
					mu.Unlock()
				}
			}(w)
		}
		time.Sleep(time.Duration(100+rand.IntN(300)) * time.Millisecond)
		p.cmd.Process.Signal(syscall.SIGKILL)
		p.wait(t, 10*time.Second)
		wg.Wait()
		if sl == nil {
			sl = dataSealer(t, dir)
		}
		st, err := bolt.Open(filepath.Join(dir, "kms.db"), bolt.Options{Sealer: sl})
		if err != nil {
			t.Fatalf("round %d: open after kill: %v", round, err)
		}
		if err := st.Check(); err != nil {
			t.Fatalf("round %d: bbolt check: %v", round, err)
		}
		st.Close()
	}
	if len(acked) < rounds*2 {
		t.Fatalf("only %d operations were acknowledged in %d rounds", len(acked), rounds)
	}
	t.Logf("%d acknowledged versions survived %d kills", len(acked), rounds)
	// A last start to check the versions acknowledged in the final round.
	p := start(t, dir)
	p.waitReady(t)
	c := adminClient(t, p, dir)
	for _, a := range acked {
		if _, err := c.PublicKey(ctx, a.name, a.version); err != nil {
			t.Fatalf("acknowledged %s v%d lost: %v", a.name, a.version, err)
		}
	}
}

// exitsWith runs kmsd on dir with args, expects exit code 1 and a last line
// containing want, and that it did not listen.
func exitsWith(t *testing.T, dir string, want string, args ...string) {
	t.Helper()
	q := start(t, dir, args...)
	if code := q.wait(t, 20*time.Second); code != 1 {
		t.Fatalf("%v: exit code %d, want 1\n%s", args, code, q.stderr.String())
	}
	out := strings.TrimRight(q.stderr.String(), "\n")
	last := out[strings.LastIndex(out, "\n")+1:]
	if !strings.HasPrefix(last, "kmsd: ") || !strings.Contains(last, want) {
		t.Fatalf("%v: last line %q does not name %q", args, last, want)
	}
}

// TestNeverASecondTokenOrKEK is the review's finding: with the embedded
// token directory missing, or another --pkcs11-token / --kek-label, kmsd
// silently made a new token or KEK and then failed every existing key. The
// store now remembers what it was sealed under; only a new data dir gets a
// token and a KEK, and any other start finds exactly those or stops with
// one line naming what is missing, creating nothing.
func TestNeverASecondTokenOrKEK(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	p := start(t, dir)
	p.waitReady(t)
	c := adminClient(t, p, dir)
	if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: "k", Kind: "ml-dsa-44"}); err != nil {
		t.Fatal(err)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	p.wait(t, 20*time.Second)
	tokens := filepath.Join(dir, "softhsm", "tokens")
	entries := func() []string {
		es, _ := os.ReadDir(tokens)
		var out []string
		for _, e := range es {
			out = append(out, e.Name())
		}
		return out
	}
	before := entries()
	if len(before) != 1 {
		t.Fatalf("token directory holds %v", before)
	}

	exitsWith(t, dir, `sealed under the key labelled "kmsd-kek" in token "kmsd"`, "--kek-label", "other-kek")
	exitsWith(t, dir, `sealed under the key labelled "kmsd-kek" in token "kmsd"`, "--pkcs11-token", "other")

	// The token directory moved away: refused, and no new one made.
	os.Rename(tokens, tokens+".moved")
	exitsWith(t, dir, "tokens is missing")
	if _, err := os.Stat(tokens); err == nil {
		t.Fatal("a new token directory was made")
	}
	// The directory is there but the token in it is not.
	os.Mkdir(tokens, 0o700)
	exitsWith(t, dir, `no token labelled "kmsd"`)
	if len(entries()) != 0 {
		t.Fatalf("a new token was made: %v", entries())
	}
	os.Remove(tokens)
	os.Rename(tokens+".moved", tokens)

	// The store says another KEK: refused.
	sl := dataSealer(t, dir)
	st, err := bolt.Open(filepath.Join(dir, "kms.db"), bolt.Options{Sealer: sl})
	if err != nil {
		t.Fatal(err)
	}
	good, _ := st.Meta("sealed-under")
	st.PutMeta("sealed-under", []byte(`{"token":"kmsd","label":"kmsd-kek","id":"00112233445566778899aabbccddeeff"}`))
	st.Close()
	exitsWith(t, dir, "sealed under the KEK with id 00112233445566778899aabbccddeeff")
	st, _ = bolt.Open(filepath.Join(dir, "kms.db"), bolt.Options{Sealer: sl})
	st.PutMeta("sealed-under", good)
	st.Close()

	// Back as it was: the key signs, nothing was lost, still one token.
	p = start(t, dir)
	p.waitReady(t)
	if _, err := adminClient(t, p, dir).Sign(ctx, "k", []byte("m"), nil); err != nil {
		t.Fatalf("sign after the refused starts: %v", err)
	}
	if got := entries(); len(got) != 1 || got[0] != before[0] {
		t.Fatalf("token directory now holds %v, before %v", got, before)
	}
}

// TestTokenGoneAndBackUnderLoad is the review's finding: with the token
// directory moved away, requests correctly got 503 but /readyz stayed 200,
// and after the token came back kmsd stayed at 503 until restarted. Now
// /readyz fails while sealing fails, and service resumes on its own within
// seconds of the token's return; no request gets a 500 meanwhile.
func TestTokenGoneAndBackUnderLoad(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	p := start(t, dir)
	p.waitReady(t)
	c := adminClient(t, p, dir)
	if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: "before", Kind: "ml-kem-768"}); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	statuses := map[int]int{}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { // load: creates, which seal in the HSM
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			_, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: fmt.Sprintf("load-%d", i), Kind: "ml-dsa-44"})
			st := client.StatusOf(err)
			if err == nil {
				st = 201
			}
			mu.Lock()
			statuses[st]++
			mu.Unlock()
			time.Sleep(5 * time.Millisecond)
		}
	}()
	tokens := filepath.Join(dir, "softhsm", "tokens")
	time.Sleep(200 * time.Millisecond)
	if err := os.Rename(tokens, tokens+".away"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for c.Ready(ctx) == nil {
		if time.Now().After(deadline) {
			t.Fatal("/readyz still answers 200 with the token gone")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := c.Ready(ctx); client.StatusOf(err) != 503 {
		t.Fatalf("/readyz with the token gone: %v", err)
	}
	time.Sleep(time.Second) // a few failed reconnection attempts
	if err := os.Rename(tokens+".away", tokens); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	for c.Ready(ctx) != nil {
		if time.Now().After(back.Add(10 * time.Second)) {
			t.Fatalf("not ready 10 s after the token came back\n%s", p.stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("ready again %v after the token came back", time.Since(back).Round(time.Millisecond))
	time.Sleep(200 * time.Millisecond)
	close(stop)
	<-done
	mu.Lock()
	defer mu.Unlock()
	if statuses[503] == 0 || statuses[201] == 0 || len(statuses) != 2 {
		t.Fatalf("statuses under load: %v (want 201s and 503s only)", statuses)
	}
	// A key sealed before the outage opens after it.
	pk, err := c.PublicKey(ctx, "before", 1)
	if err != nil {
		t.Fatal(err)
	}
	ek, err := mlkem.NewEncapsulationKey768(pk.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	ss, ct := ek.Encapsulate()
	got, err := c.Decapsulate(ctx, "before", 1, ct)
	if err != nil || !bytes.Equal(got.SharedSecret, ss) {
		t.Fatalf("decapsulate after the outage: %v", err)
	}
	if !strings.Contains(p.stderr.String(), "connection re-established") {
		t.Fatal("the reconnection was not logged")
	}
}

// dataSealer opens the sealer of the embedded token kmsd made in dir (the
// store's record key is sealed under its KEK), closed at the test's end.
func dataSealer(t *testing.T, dir string) kms.Sealer {
	t.Helper()
	st, err := softhsm.Bootstrap(filepath.Join(dir, "softhsm"), "kmsd", false)
	if err != nil {
		t.Fatal(err)
	}
	pin, err := softhsm.ReadPIN(st.PINFile)
	if err != nil {
		t.Fatal(err)
	}
	s, err := hsm.Open(hsm.Config{Module: st.Module, TokenLabel: "kmsd", KEKLabel: "kmsd-kek", PIN: pin})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}
