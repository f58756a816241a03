package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/internal/testutil"
)

// TestREADMEListsEveryFlag: the configuration table in README.md names every
// kmsd flag with its environment variable, and no flag kmsd lacks.
func TestREADMEListsEveryFlag(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	var c config
	fs := newFlagSet(&c, func(string) string { return "" })
	row := regexp.MustCompile("(?m)^\\| `--([a-z0-9-]+)` \\| `(KMS_[A-Z0-9_]+)` \\|")
	inREADME := map[string]string{}
	for _, m := range row.FindAllStringSubmatch(string(readme), -1) {
		inREADME[m[1]] = m[2]
	}
	fs.VisitAll(func(f *flag.Flag) {
		env, ok := inREADME[f.Name]
		if !ok {
			t.Errorf("README.md's configuration table lacks --%s", f.Name)
			return
		}
		if !strings.Contains(f.Usage, "env "+env) || envFlag(env) != f.Name {
			t.Errorf("--%s: README says %s, the flag's help says %q", f.Name, env, f.Usage)
		}
		delete(inREADME, f.Name)
	})
	for name := range inREADME {
		t.Errorf("README.md lists --%s, which kmsd does not have", name)
	}
}

// readmeBlock is one ```sh block of README.md.
type readmeBlock struct {
	line int    // of the opening fence
	text string // the commands
	skip string // why the test does not run it ("" : it runs)
}

func readmeBlocks(t *testing.T) []readmeBlock {
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	skipRE := regexp.MustCompile(`^<!-- readme-test: skip \((.+)\) -->$`)
	var out []readmeBlock
	lines := strings.Split(string(b), "\n")
	for i := 0; i < len(lines); i++ {
		if lines[i] != "```sh" {
			continue
		}
		blk := readmeBlock{line: i + 1}
		if i > 0 {
			if m := skipRE.FindStringSubmatch(lines[i-1]); m != nil {
				blk.skip = m[1]
			}
		}
		var body []string
		for i++; i < len(lines) && lines[i] != "```"; i++ {
			body = append(body, lines[i])
		}
		blk.text = strings.Join(body, "\n")
		out = append(out, blk)
	}
	return out
}

// TestREADMERunsAsWritten runs every sh block of README.md, in order, in
// one bash (so a block sees the variables of the ones before it, as a
// reader's shell does) with `set -euo pipefail`, from a directory laid out
// as the README assumes (bin/kmsd, bin/kmsctl, ./data), against kmsd
// started on a fresh data dir with its defaults. Only the blocks that run until
// interrupted or need root and a package install are left out, each marked
// in README.md with the reason and tested elsewhere. The one liberty: kmsd
// listens on a free port instead of 8420 (blocks have 127.0.0.1:8420
// replaced, kmsctl gets KMS_URL), so the test cannot collide with a kmsd
// already running.
func TestREADMERunsAsWritten(t *testing.T) {
	for _, tool := range []string{"bash", "curl", "jq", "pkcs11-tool", "promtool"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("README.md's commands need %s: deploy/test.sh installs it (deploy/deps.sh kmsd_test_deps)", tool)
		}
	}
	work := t.TempDir()
	os.Mkdir(filepath.Join(work, "bin"), 0o755)
	for _, b := range []string{kmsdBin, kmsctlBin, mcpBin} {
		if err := os.Symlink(b, filepath.Join(work, "bin", filepath.Base(b))); err != nil {
			t.Fatal(err)
		}
	}
	// As README's audit archive and metrics sections say kmsd was started.
	metricsAddr := freeAddr(t)
	p := start(t, filepath.Join(work, "data"), "--audit-archive", filepath.Join(work, "audit-archive"), "--metrics-addr", metricsAddr)
	p.waitReady(t)
	mcpAddr := freeAddr(t)
	mcpStart := ""
	var script strings.Builder
	script.WriteString("set -euo pipefail\n")
	ran := 0
	var skipped []string
	for _, b := range readmeBlocks(t) {
		if b.skip != "" {
			skipped = append(skipped, strings.TrimSpace(b.text))
			continue
		}
		ran++
		// kmsd and kmsd-mcp run on other ports than README's defaults,
		// given through the variables README's blocks read them from
		// (KMS_URL, KMSD_MCP_HTTP): an address written into a block
		// instead fails here.
		rest := strings.ReplaceAll(b.text, "${KMS_URL:-https://127.0.0.1:8420}", "")
		rest = strings.ReplaceAll(rest, "${KMSD_MCP_HTTP:-127.0.0.1:8421}", "")
		for _, n := range []string{"A:-127.0.0.1:8441", "B:-127.0.0.1:8442", "C:-127.0.0.1:8443"} {
			rest = strings.ReplaceAll(rest, "${KMS_NODE_"+n+"}", "")
		}
		rest = strings.ReplaceAll(rest, "${KMS_METRICS_ADDR:-127.0.0.1:9420}", "")
		if m := hardAddr.FindString(rest); m != "" {
			t.Errorf("README.md block at line %d writes the address %s: take it from $K / $MCP_ADDR", b.line, m)
		}
		if strings.Contains(b.text, "bin/kmsd-mcp --kms-url") {
			mcpStart = b.text
		}
		fmt.Fprintf(&script, "echo '### README.md block at line %d' >&2\n%s\n", b.line, b.text)
	}
	// Only the commands that run until interrupted (or run this test) may
	// be skipped; each has a test of its own.
	ock := "eval \"$(./deploy/ock.sh)\"   # OCK_MODULE, OCK_TOKEN, OCK_PIN_FILE\nbin/kmsd --data-dir ./data-ock --pkcs11-module \"$OCK_MODULE\" --pkcs11-token \"$OCK_TOKEN\" --pkcs11-pin-file \"$OCK_PIN_FILE\""
	if want := []string{"./deploy/start.sh", "./deploy/test.sh", "./deploy/replicas.sh ./replicas", ock}; ran < 3 || !slices.Equal(skipped, want) {
		t.Fatalf("README.md: %d blocks to run, skipped %q; want the walk-throughs run and only %q skipped", ran, skipped, want)
	}
	cmd := exec.Command("bash", "-c", script.String())
	cmd.Dir = work
	// Its own process group: whatever a block starts in the background
	// (kmsd-mcp) is killed with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	// A background process left by a failed block keeps the output pipe
	// open: stop waiting for it soon after bash exits.
	cmd.WaitDelay = 5 * time.Second
	t.Cleanup(func() {
		if cmd.Process != nil {
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		}
	})
	cmd.Env = append(os.Environ(), "KMS_URL=https://"+p.addr, "KMSD_MCP_HTTP="+mcpAddr, "KMS_METRICS_ADDR="+metricsAddr,
		"KMS_NODE_A="+freeAddr(t), "KMS_NODE_B="+freeAddr(t), "KMS_NODE_C="+freeAddr(t))
	var out testutil.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		text := out.String()
		block := text[max(0, strings.LastIndex(text, "### README.md block")):]
		t.Fatalf("README.md does not run as written: %v\n%s", err, block)
	}
	// What the blocks left behind is what they say.
	for _, f := range []string{"pk.bin", "ss.bin", "session-kem.pub", "kmsd-identity.pub", "last.checkpoint", "audit-export/records.jsonl"} {
		if fi, err := os.Stat(filepath.Join(work, f)); err != nil || fi.Size() == 0 {
			t.Errorf("README.md's commands did not write %s: %v", f, err)
		}
	}
	// The MCP client configurations are JSON.
	b, _ := os.ReadFile("../../README.md")
	jsonBlock := regexp.MustCompile("(?s)```json\n(.*?)```")
	blocks := jsonBlock.FindAllStringSubmatch(string(b), -1)
	if len(blocks) < 2 {
		t.Errorf("README.md has %d json blocks, want the two MCP client configurations", len(blocks))
	}
	for _, m := range blocks {
		if !json.Valid([]byte(m[1])) {
			t.Errorf("README.md: a json block is not JSON:\n%s", m[1])
		}
	}
	if !strings.Contains(out.String(), "audit log intact") {
		t.Errorf("audit verify did not say the log is intact:\n%s", out.String())
	}
	if n := strings.Count(out.String(), "audit archive intact"); n != 2 {
		t.Errorf("audit verify --archive said the archive is intact %d times, want 2:\n%s", n, out.String())
	}

	// The kmsd-mcp start block given a token kmsd refuses: it ends at
	// once (kmsd-mcp exits), non-zero, showing the 401 from its log.
	if mcpStart == "" {
		t.Fatal("README.md has no block that starts kmsd-mcp")
	}
	if err := os.WriteFile(filepath.Join(work, "mcp-worker.token"), []byte("kmsd_not-a-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	bad := exec.Command("bash", "-c", "set -euo pipefail\nK=https://"+p.addr+"\n"+mcpStart)
	bad.Dir = work
	bad.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	bad.WaitDelay = 5 * time.Second
	bad.Env = append(os.Environ(), "KMSD_MCP_HTTP="+freeAddr(t))
	var badOut testutil.Buffer
	bad.Stdout, bad.Stderr = &badOut, &badOut
	if err := bad.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Kill(-bad.Process.Pid, syscall.SIGKILL) })
	done := make(chan error, 1)
	go func() { done <- bad.Wait() }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(badOut.String(), "401") || !strings.Contains(badOut.String(), "kmsd-mcp is not answering") {
			t.Fatalf("README's kmsd-mcp start with a refused token: %v, want a failure showing the 401:\n%s", err, badOut.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("README's kmsd-mcp start with a refused token did not end within 60 s (its deadline is 30 s):\n%s", badOut.String())
	}
}

// hardAddr is a loopback address written into a README block.
var hardAddr = regexp.MustCompile(`127\.0\.0\.1:\d+`)
