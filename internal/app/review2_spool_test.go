package app

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kmsd-project/kmsd/hsm"
	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/backup"
	"github.com/kmsd-project/kmsd/store/bolt"
)

// slowClient is the backup's HTTP client; the first time it is sent data
// after the spool is complete, whoever writes the data dir rewrites the
// spool's token records not sent yet.
type slowClient struct {
	t        *testing.T
	dir      string
	buf      bytes.Buffer
	tampered bool
	hash     []byte
}

func (c *slowClient) Write(p []byte) (int, error) {
	if !c.tampered {
		// Unlinked at once: reached through /proc, as whoever runs as
		// kmsd could.
		fds, _ := filepath.Glob("/proc/self/fd/*")
		for _, fd := range fds {
			if target, err := os.Readlink(fd); err == nil && strings.Contains(target, ".dump-spool-") {
				if fi, err := os.Stat(fd); err == nil && fi.Size() > 6<<20 {
					c.tampered = rewriteSpoolTokens(c.t, fd, c.hash)
				}
			}
		}
	}
	return c.buf.Write(p)
}

func rewriteSpoolTokens(t *testing.T, name string, hash []byte) bool {
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	var out []byte
	first := -1
	for off := 0; off+5 <= len(b); {
		n := int(binary.BigEndian.Uint32(b[off+1 : off+5]))
		frame := b[off : off+5+n]
		if b[off] == 'T' {
			var tok kms.Token
			if err := json.Unmarshal(b[off+5:off+5+n], &tok); err != nil {
				t.Fatal(err)
			}
			if first < 0 {
				first = off
			}
			tok.Role, tok.Keys, tok.Hash, tok.RevokedAt, tok.ExpiresAt = kms.RoleAdmin, []string{"*"}, hash, nil, nil
			nb, _ := json.Marshal(&tok)
			var hd [5]byte
			hd[0] = 'T'
			binary.BigEndian.PutUint32(hd[1:], uint32(len(nb)))
			frame = append(hd[:], nb...)
		}
		if first >= 0 {
			out = append(out, frame...)
		}
		off += 5 + n
	}
	if first < 0 {
		return false
	}
	f, err := os.OpenFile(name, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(out, int64(first)); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(int64(first + len(out))); err != nil {
		t.Fatal(err)
	}
	return true
}

// TestReview2SignedBackupHoldsForgedToken (an outside review's finding,
// now a regression test): App.Backup on a bolt store whose spool file is
// rewritten while the backup is sent on signed a backup whose tokens were
// all admins over "*" with a hash of the attacker's choosing. Now the
// backup fails (its stream is cut without a trailer), and the bytes sent
// are refused by every reader.
func TestReview2SignedBackupHoldsForgedToken(t *testing.T) {
	ctx := context.Background()
	label := "review2-sp-" + reviewID()[:8]
	cfg := testhsm.Config(t)
	cfg.KEKLabel = label
	sealer, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer sealer.Close()
	dir := t.TempDir()
	st, err := bolt.Open(filepath.Join(dir, "kms.db"), bolt.Options{Sealer: sealer})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	st.PutMeta("sealed-under", []byte(`{"token":"kmsd-test","label":"`+label+`","id":"`+sealer.KEKID()+`"}`))
	a, err := New(ctx, Config{Store: st, AuditStore: st.Audit(), Sealer: sealer, AdminToken: func(string) error { return nil }})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	// A store of a few MiB (a real one: keys, versions, an audit log).
	for i := 0; i < 2; i++ {
		if err := st.PutMeta("a-padding-"+string(rune('0'+i)), bytes.Repeat([]byte("p"), 3<<20)); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := a.Service.CreateToken(ctx, reviewAdmin, kms.TokenRequest{Name: "ci", Role: kms.RoleWorker, Keys: []string{"ci-*"}}); err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256([]byte("attacker's secret"))
	w := &slowClient{t: t, dir: dir, hash: h[:]}
	_, _, err = a.Backup(ctx, w, false)
	if !w.tampered {
		t.Fatal("the spool was not rewritten")
	}
	if err == nil || !strings.Contains(err.Error(), "spool file was changed") {
		t.Fatalf("a backup whose spool was rewritten while it was sent: %v", err)
	}
	toks := &tokenCatcher{}
	f, err := backup.Read(bytes.NewReader(w.buf.Bytes()), toks)
	if err != nil {
		t.Logf("the bytes sent are refused: %v", err)
		return
	}
	if err := backup.Verify(f); err != nil {
		t.Logf("the backup is refused: %v", err)
		return
	}
	for _, tk := range toks.tokens {
		orig, err := st.GetToken(ctx, tk.ID)
		if err != nil {
			t.Errorf("the signed backup holds token %s, which the store does not: %v", tk.ID, err)
			continue
		}
		if tk.Role != orig.Role || !bytes.Equal(tk.Hash, orig.Hash) {
			t.Errorf("backup %s, signed by kmsd's identity key (backup.Verify passes), holds token %s as %s over %v with the attacker's hash; the store holds it as %s over %v", f.ID[:12], tk.ID, tk.Role, tk.Keys, orig.Role, orig.Keys)
		}
	}
}

type tokenCatcher struct {
	backup.Discard
	tokens []*kms.Token
}

func (c *tokenCatcher) Token(t *kms.Token) error {
	c.tokens = append(c.tokens, t)
	return nil
}
