package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/internal/testock"
)

// endToEnd is what kmsd must do on every PKCS#11 implementation, through
// kmsctl: keys of every kind (ML-DSA, ML-KEM, CKKS), a signature, a
// decapsulation, an HE encryption decrypted through kmsd, a rotation;
// then (after kmsd restarted) everything sealed before still opens.
const endToEnd = `
set -euo pipefail
k() { "$KMSCTL" "$@"; }
k keys create e2e-sig --kind ml-dsa-65 >/dev/null
k keys create e2e-kem --kind ml-kem-768 >/dev/null
k keys create e2e-he --kind ckks --params ckks-logn13 --decrypt-budget 16 >/dev/null
SIG=$(k sign e2e-sig --message aGVsbG8= | jq -r .signature)
k verify e2e-sig --version 1 --signature "$SIG" --message aGVsbG8= >/dev/null
CT=$(k encapsulate e2e-kem --shared-secret-file ss.bin | jq -r .ciphertext)
k decapsulate e2e-kem --version 1 --ciphertext "$CT" | jq -r .shared_secret > ss1.b64
[ "$(base64 -w0 < ss.bin)" = "$(cat ss1.b64)" ]
k tokens create --role encryptor --keys 'e2e-*' | jq -r .token > enc.token
k he fetch e2e-he --dir he-keys --identity-key-file id.pub --fetch-identity >/dev/null
echo '[0.5, -2]' | KMS_TOKEN_FILE=enc.token "$KMSCTL" he encrypt --key e2e-he --identity-key-file id.pub > ct.json
k he decrypt < ct.json | jq -e 'map(. * 100 | round / 100) == [0.5,-2]' >/dev/null
k keys rotate e2e-sig >/dev/null
k keys rotate e2e-kem >/dev/null
echo "$SIG" > sig.txt
echo "$CT" > kem.ct
`

// afterRestart checks what was sealed before the restart.
const afterRestart = `
set -euo pipefail
k() { "$KMSCTL" "$@"; }
k decapsulate e2e-kem --version 1 --ciphertext "$(cat kem.ct)" | jq -r .shared_secret > ss2.b64
[ "$(base64 -w0 < ss.bin)" = "$(cat ss2.b64)" ]
k he decrypt < ct.json | jq -e 'map(. * 100 | round / 100) == [0.5,-2]' >/dev/null
k sign e2e-sig --message aGVsbG8= >/dev/null
k verify e2e-sig --version 1 --signature "$(cat sig.txt)" --message aGVsbG8= >/dev/null
`

func runScript(t *testing.T, p *proc, work, script string) {
	t.Helper()
	cmd := exec.Command("bash", "-c", script)
	cmd.Dir = work
	cmd.Env = append(os.Environ(), "KMSCTL="+kmsctlBin, "KMS_URL="+p.url(),
		"KMS_TOKEN_FILE="+filepath.Join(p.dataDir, "admin.token"), "KMS_CA_CERT="+filepath.Join(p.dataDir, "tls", "ca.pem"))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s\nkmsd:\n%s", err, out, p.stderr.String())
	}
}

// TestEveryKindOnBothHSMs runs the same end-to-end script on kmsd over
// SoftHSM2 (the embedded default; and with --pkcs11-wrap kwp) and over
// Debian's opencryptoki soft token (a second real PKCS#11 implementation,
// without AES-GCM: kmsd picks the cbc-hmac wrap profile there), restarting
// kmsd in between.
func TestEveryKindOnBothHSMs(t *testing.T) {
	for _, hsmName := range []string{"softhsm2", "softhsm2-kwp", "opencryptoki"} {
		t.Run(hsmName, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "data")
			work := t.TempDir()
			var args []string
			want := `"wrap_profile":"gcm"`
			if hsmName == "softhsm2-kwp" {
				args = []string{"--pkcs11-wrap", "kwp"}
				want = `"wrap_profile":"kwp"`
			}
			if hsmName == "opencryptoki" {
				cfg := testock.Config(t)
				_, _, pinFile := testock.Setup(t)
				args = []string{"--pkcs11-module", cfg.Module, "--pkcs11-token", cfg.TokenLabel, "--pkcs11-pin-file", pinFile, "--kek-label", cfg.KEKLabel}
				want = `"wrap_profile":"cbc-hmac"`
			}
			p := start(t, dir, args...)
			p.waitReady(t)
			if !strings.Contains(p.stderr.String(), want) {
				t.Fatalf("kmsd did not log %s:\n%s", want, p.stderr.String())
			}
			runScript(t, p, work, endToEnd)
			p.cmd.Process.Signal(syscall.SIGTERM)
			if code := p.wait(t, 20*time.Second); code != 0 {
				t.Fatalf("exit %d\n%s", code, p.stderr.String())
			}
			p2 := start(t, dir, args...)
			p2.waitReady(t)
			runScript(t, p2, work, afterRestart)
		})
	}
}

// TestHSMRefusalLeavesDataDirEmpty: a first start that the HSM refuses
// (here: the gcm wrap profile on a token without AES-GCM) stops naming
// what the token lacks, and leaves the new data dir as empty as it found
// it, so the next start is a first start again.
func TestHSMRefusalLeavesDataDirEmpty(t *testing.T) {
	cfg := testock.Config(t)
	_, _, pinFile := testock.Setup(t)
	dir := filepath.Join(t.TempDir(), "data")
	exitsWith(t, dir, "CKM_AES_GCM", "--pkcs11-module", cfg.Module, "--pkcs11-token", cfg.TokenLabel, "--pkcs11-pin-file", pinFile, "--kek-label", cfg.KEKLabel, "--pkcs11-wrap", "gcm")
	entries, err := os.ReadDir(dir)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	if len(entries) != 0 {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Fatalf("the refused start left %v in the data dir", names)
	}
}
