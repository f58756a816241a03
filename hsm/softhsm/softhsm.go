// Package softhsm sets up the embedded default HSM: a SoftHSM2 token in the
// data dir, with its config, token directory and generated PINs, so that
// kmsd starts with one command on a new machine.
package softhsm

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/kmsd-project/kmsd/hsm"
	"github.com/kmsd-project/kmsd/internal/fileutil"
)

// ModulePaths are where Debian, Ubuntu, Fedora and source installs put the
// SoftHSM2 library.
var ModulePaths = []string{
	"/usr/lib/softhsm/libsofthsm2.so",
	"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/lib64/pkcs11/libsofthsm2.so",
	"/usr/local/lib/softhsm/libsofthsm2.so",
}

// FindModule returns the first SoftHSM2 library found.
func FindModule() (string, error) {
	for _, p := range ModulePaths {
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("SoftHSM2 is not installed (looked in %s); install it (Debian: apt-get install softhsm2) or pass --pkcs11-module", strings.Join(ModulePaths, ", "))
}

// Setup is what Bootstrap made: enough to open the sealer.
type Setup struct {
	Module     string
	Conf       string // SOFTHSM2_CONF
	TokenLabel string
	PINFile    string
	// ConfUpdated: the conf named another token directory than the data
	// dir's (moved, or first given relative to another working
	// directory) and was rewritten.
	ConfUpdated bool
}

// confHeader starts the softhsm2.conf kmsd writes (and keeps up to date).
const confHeader = "# written by kmsd on first start"

// ErrMissing: a part of the embedded token is gone from a data dir that
// had one; Bootstrap makes a new token only when asked to (a new data dir).
var ErrMissing = errors.New("the embedded SoftHSM token is incomplete")

// Bootstrap prepares <dir>/softhsm.conf, <dir>/tokens, <dir>/pin and
// <dir>/so-pin, sets SOFTHSM2_CONF for this process, and initializes the
// token with label. With create false (a data dir that has keys or was
// sealed before) nothing is made: a missing file or token is ErrMissing,
// naming it, so that a moved token directory never becomes a new, empty
// token.
func Bootstrap(dir, label string, create bool) (Setup, error) {
	mod, err := FindModule()
	if err != nil {
		return Setup{}, err
	}
	st := Setup{Module: mod, Conf: filepath.Join(dir, "softhsm2.conf"), TokenLabel: label, PINFile: filepath.Join(dir, "pin")}
	tokens := filepath.Join(dir, "tokens")
	if !create {
		for _, f := range []string{st.Conf, tokens, st.PINFile} {
			if _, err := os.Stat(f); err != nil {
				return st, fmt.Errorf("%w: %s is missing (moved or deleted?); kmsd made it at first start and will not make a new one", ErrMissing, f)
			}
		}
	}
	if err := os.MkdirAll(tokens, 0o700); err != nil {
		return st, err
	}
	// The token directory is the one in this data dir, named by its
	// absolute path: SoftHSM reads a relative one from its working
	// directory, and a conf that kept the path of another place (the data
	// dir moved to a new disk, or first given relative to another working
	// directory) would point at no token. A conf kmsd wrote is brought up
	// to date at every start; one it did not write is left as it is.
	abs, err := filepath.Abs(tokens)
	if err != nil {
		return st, err
	}
	conf := fmt.Sprintf("%s\ndirectories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", confHeader, abs)
	cur, err := os.ReadFile(st.Conf)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if err := fileutil.WriteAtomic(st.Conf, []byte(conf), 0o600); err != nil {
			return st, err
		}
	case err != nil:
		return st, err
	case strings.HasPrefix(string(cur), confHeader) && string(cur) != conf:
		if err := fileutil.WriteAtomic(st.Conf, []byte(conf), 0o600); err != nil {
			return st, err
		}
		st.ConfUpdated = true
	}
	if err := os.Setenv("SOFTHSM2_CONF", st.Conf); err != nil {
		return st, err
	}
	pin, err := readOrCreateSecret(st.PINFile)
	if err != nil {
		return st, err
	}
	soPIN, err := readOrCreateSecret(filepath.Join(dir, "so-pin"))
	if err != nil {
		return st, err
	}
	m, err := hsm.LoadModule(mod)
	if err != nil {
		return st, err
	}
	defer m.Destroy()
	if err := m.Initialize(); err != nil {
		return st, fmt.Errorf("%w: C_Initialize: %v", hsm.ErrModule, err)
	}
	defer m.Finalize()
	if _, err := hsm.FindToken(m, label); err == nil {
		return st, nil
	} else if !errors.Is(err, hsm.ErrTokenNotFound) {
		return st, err
	}
	if !create {
		return st, fmt.Errorf("%w: no token labelled %q in %s (moved or deleted?); kmsd made it at first start and will not make a new one", ErrMissing, label, tokens)
	}
	if err := hsm.InitToken(m, label, soPIN, pin); err != nil {
		return st, err
	}
	return st, nil
}

// ReadPIN reads a PIN file, trimming one trailing newline.
func ReadPIN(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	return strings.TrimRight(string(b), "\r\n"), nil
}

func readOrCreateSecret(path string) (string, error) {
	if pin, err := ReadPIN(path); err == nil {
		return pin, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return "", err
	}
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	pin := hex.EncodeToString(b)
	if err := fileutil.WriteAtomic(path, []byte(pin+"\n"), 0o600); err != nil {
		return "", err
	}
	return pin, nil
}
