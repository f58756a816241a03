package backup_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/kms/pqc"
	"github.com/kmsd-project/kmsd/store/backup"
)

func TestMain(m *testing.M) { testhsm.Main(m) }

var ctx = context.Background()

func dsa(t *testing.T) kms.SigningKind {
	for _, k := range pqc.Kinds() {
		if k.Name() == kms.IdentityKind {
			return k.(kms.SigningKind)
		}
	}
	t.Fatal("no ml-dsa-65")
	return nil
}

// identity makes an identity key: its version (secret sealed under
// sealer, or the sealed bytes given) and its private key.
func identity(t *testing.T, sealer kms.Sealer, sealed []byte) (*kms.Version, kms.PrivateKey) {
	t.Helper()
	k := dsa(t)
	secret, pub, err := k.Generate(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	priv, err := k.Load(secret)
	if err != nil {
		t.Fatal(err)
	}
	if sealed == nil {
		if sealed, err = sealer.Seal(ctx, kms.SealContext{Key: kms.IdentityKeyName, Version: 1, Kind: kms.IdentityKind}, secret); err != nil {
			t.Fatal(err)
		}
	}
	return &kms.Version{Number: 1, State: kms.StateEnabled, CreatedAt: time.Now().UTC(), PublicKey: pub, Sealed: sealed}, priv
}

// write makes a backup holding the identity version v, signed with priv.
func write(t *testing.T, v *kms.Version, priv kms.PrivateKey) []byte {
	t.Helper()
	var buf bytes.Buffer
	w, err := backup.NewWriter(&buf, backup.Header{Created: "2026-12-07T00:00:00Z", Store: "bolt", Kmsd: "test", WithBlobs: true})
	if err != nil {
		t.Fatal(err)
	}
	blob := bytes.Repeat([]byte("evaluation key "), 100)
	steps := []error{
		w.Meta("sealed-under", []byte(`{"id":"1"}`)),
		w.Key(&kms.Key{Name: kms.IdentityKeyName, Kind: kms.IdentityKind, Primary: 1, Latest: 1}),
		w.Version(kms.IdentityKeyName, v),
		w.Key(&kms.Key{Name: "app", Kind: "ml-kem-768", Primary: 1, Latest: 1}),
		w.Version("app", &kms.Version{Number: 1, State: kms.StateEnabled, Sealed: []byte("sealed"), Blobs: []string{"x"}}),
		w.Token(&kms.Token{ID: "t1", Role: kms.RoleAdmin, Keys: []string{"*"}, Hash: []byte("h")}),
		w.AuditRow(0, []byte("row0")),
		w.AuditRow(1, []byte("row1")),
		w.AuditEnd(2, 0),
		w.Checkpoint(2, []byte("note")),
		w.Blob(sha256.Sum256(blob), int64(len(blob)), bytes.NewReader(blob)),
	}
	for i, err := range steps {
		if err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
	}
	k := dsa(t)
	_, id, err := w.Finish(ctx, func(_ context.Context, digest []byte) ([]byte, uint64, error) {
		sig, err := k.Sign(rand.Reader, priv, digest, []byte(backup.SignContext))
		return sig, 1, err
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(id) != 64 {
		t.Fatalf("id %q", id)
	}
	return buf.Bytes()
}

// check reads, verifies and binds b to sealer; the first error.
func check(b []byte, sealer kms.Sealer) (*backup.File, error) {
	f, err := backup.Read(bytes.NewReader(b), backup.Discard{})
	if err != nil {
		return nil, err
	}
	if err := backup.Verify(f); err != nil {
		return nil, err
	}
	return f, backup.BindHSM(ctx, sealer, f)
}

// TestBackupFileChecks: a backup reads back with its summary; every
// one-byte change anywhere, every cut and any byte appended is refused.
func TestBackupFileChecks(t *testing.T) {
	sealer := testhsm.Open(t)
	v, priv := identity(t, sealer, nil)
	good := write(t, v, priv)
	f, err := check(good, sealer)
	if err != nil {
		t.Fatal(err)
	}
	if s := f.Summary; s.Keys != 2 || s.Versions != 2 || s.Tokens != 1 || s.AuditRows != 2 || s.AuditSize != 2 || s.CheckpointSize != 2 || s.Blobs != 1 || s.BlobBytes != 1500 || s.Metas != 1 {
		t.Fatalf("summary %+v", s)
	}
	for i := range good {
		b := bytes.Clone(good)
		b[i] ^= 0x20
		if _, err := check(b, sealer); err == nil {
			t.Fatalf("a change of byte %d of %d was accepted", i, len(good))
		}
	}
	for n := range len(good) {
		if _, err := backup.Read(bytes.NewReader(good[:n]), backup.Discard{}); !errors.Is(err, backup.ErrMalformed) {
			t.Fatalf("a file cut at %d of %d bytes: %v", n, len(good), err)
		}
	}
	if _, err := backup.Read(bytes.NewReader(append(bytes.Clone(good), 0)), backup.Discard{}); err == nil || !strings.Contains(err.Error(), "after the trailer") {
		t.Fatalf("a byte after the trailer: %v", err)
	}
}

// TestBackupNotOfThisHSM: a backup signed by a key the file lists but
// that is not sealed under this HSM's KEK passes its own signature check
// and is refused by BindHSM: with sealed bytes that do not open, and
// with the genuine sealed identity of this HSM beside another public key.
func TestBackupNotOfThisHSM(t *testing.T) {
	sealer := testhsm.Open(t)
	forged, fpriv := identity(t, sealer, []byte("not sealed by this HSM"))
	b := write(t, forged, fpriv)
	if _, err := check(b, sealer); !errors.Is(err, backup.ErrNotGenuine) {
		t.Fatalf("an identity that does not open: %v", err)
	}
	genuine, _ := identity(t, sealer, nil)
	other, opriv := identity(t, sealer, nil)
	mixed := *other
	mixed.Sealed = genuine.Sealed // this HSM's sealed identity, another public key
	b = write(t, &mixed, opriv)
	f, err := backup.Read(bytes.NewReader(b), backup.Discard{})
	if err != nil {
		t.Fatal(err)
	}
	if err := backup.Verify(f); err != nil {
		t.Fatalf("the forger's own signature should verify: %v", err)
	}
	if err := backup.BindHSM(ctx, sealer, f); !errors.Is(err, backup.ErrNotGenuine) {
		t.Fatalf("a sealed identity beside another public key: %v", err)
	}
}

// TestWriterRefusesDisorder: a store that sends its content out of order
// (a key after the tokens) or a blob that is not its digest fails the
// backup.
func TestWriterRefusesDisorder(t *testing.T) {
	w, err := backup.NewWriter(io.Discard, backup.Header{})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Token(&kms.Token{ID: "t"}); err != nil {
		t.Fatal(err)
	}
	if err := w.Key(&kms.Key{Name: "late"}); err == nil {
		t.Fatal("a key after the tokens was written")
	}
	w, _ = backup.NewWriter(io.Discard, backup.Header{})
	var d [32]byte
	if err := w.Blob(d, 3, strings.NewReader("abc")); err == nil || !strings.Contains(err.Error(), "does not hash") {
		t.Fatalf("a blob that is not its digest: %v", err)
	}
}
