// Package testock gives tests a second real PKCS#11 implementation:
// Debian's opencryptoki soft token, set up by deploy/ock.sh (run on first
// use, as the tests run as root the way deploy/test.sh does).
package testock

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/kmsd-project/kmsd/hsm"
	"github.com/kmsd-project/kmsd/hsm/softhsm"
)

var (
	once  sync.Once
	env   map[string]string
	setup error
	out   []byte
)

// Setup runs deploy/ock.sh once and returns the module path, the token
// label and the PIN file it printed.
func Setup(t testing.TB) (module, token, pinFile string) {
	t.Helper()
	once.Do(func() {
		_, file, _, _ := runtime.Caller(0)
		script := filepath.Join(filepath.Dir(file), "..", "..", "deploy", "ock.sh")
		var stderr bytes.Buffer
		cmd := exec.Command("bash", script)
		cmd.Stderr = &stderr
		out, setup = cmd.Output()
		if setup != nil {
			out = append(out, stderr.Bytes()...)
			return
		}
		env = map[string]string{}
		sc := bufio.NewScanner(bytes.NewReader(out))
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), "="); ok {
				env[k] = v
			}
		}
	})
	if setup != nil {
		t.Fatalf("deploy/ock.sh (opencryptoki, needs root and apt): %v\n%s", setup, out)
	}
	return env["OCK_MODULE"], env["OCK_TOKEN"], env["OCK_PIN_FILE"]
}

// Config returns an hsm.Config for the opencryptoki token with a KEK label
// of the test's own; the KEK (and a MAC key beside it) are destroyed when
// the test ends, so the token does not fill up.
func Config(t testing.TB) hsm.Config {
	t.Helper()
	module, token, pinFile := Setup(t)
	pin, err := softhsm.ReadPIN(pinFile)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 6)
	rand.Read(b)
	label := "kek-" + hex.EncodeToString(b)
	t.Cleanup(func() { destroy(t, module, token, pin, label) })
	return hsm.Config{Module: module, TokenLabel: token, PIN: pin, KEKLabel: label, CreateKEK: true}
}

// destroy removes the test's keys from the token.
func destroy(t testing.TB, module, token, pin, label string) {
	mod := pkcs11.New(module)
	if mod == nil {
		return
	}
	finalize := mod.Initialize() == nil
	defer func() {
		if finalize {
			mod.Finalize()
		}
	}()
	slot, err := hsm.FindToken(mod, token)
	if err != nil {
		return
	}
	sh, err := mod.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return
	}
	defer mod.CloseSession(sh)
	_ = mod.Login(sh, pkcs11.CKU_USER, pin)
	for _, l := range []string{label, label + "-mac"} {
		if mod.FindObjectsInit(sh, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, l)}) != nil {
			continue
		}
		objs, _, _ := mod.FindObjects(sh, 4)
		mod.FindObjectsFinal(sh)
		for _, o := range objs {
			if err := mod.DestroyObject(sh, o); err != nil {
				t.Logf("testock: destroy %s: %v", l, err)
			}
		}
	}
}
