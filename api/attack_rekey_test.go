package api_test

import (
	"context"
	"encoding/json"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/api/client/hekeys"
	"github.com/kmsd-project/kmsd/he"
	"github.com/kmsd-project/kmsd/kms"
)

// TestRekeyFromRetiredSourceRefused: a ciphertext of a version that is
// disabled, or destroyed (crypto-shredded), is not decrypted by kmsd, so
// kmsd must not vouch for its re-keying into a later version either:
// otherwise whoever kept the (public) switching key turns any old
// ciphertext of the retired version into one kmsd decrypts under the new
// version, after the version was disabled or shredded.
func TestRekeyFromRetiredSourceRefused(t *testing.T) {
	e := newEnv(t)
	admin := e.client(e.admin)
	heKey(t, e, "rs", `{"name":"rs","kind":"ckks","policy":{"params":"ckks-logn13","decrypt_budget":16}}`)
	ev := mustToken(t, e, "evaluator", "rs")
	f := &hekeys.Fetcher{BaseURL: e.url, Token: ev, IdentityKey: e.idPub, CacheDir: t.TempDir(), HTTP: e.httpc}
	v1, err := f.FetchPublic(ctx, "rs", 1)
	if err != nil {
		t.Fatal(err)
	}
	in, err := v1.Encrypt([]float64{1, 2, 3})
	if err != nil {
		t.Fatal(err)
	}
	attestInput(t, e, in)
	if _, err := admin.Rotate(ctx, "rs"); err != nil {
		t.Fatal(err)
	}
	m2, err := f.Manifest(ctx, "rs", 2)
	if err != nil {
		t.Fatal(err)
	}
	// The switching key is issued while version 1 is enabled (legitimate).
	if _, err := admin.SwitchingKey(ctx, "rs", 1, 2); err != nil {
		t.Fatal(err)
	}
	swk, err := f.SwitchingKey(ctx, v1, 2, false)
	if err != nil {
		t.Fatal(err)
	}
	out, err := hekeys.Rekey(v1, m2, swk, in)
	if err != nil {
		t.Fatal(err)
	}

	// Version 1 disabled: its ciphertexts are not decrypted...
	if _, err := admin.VersionAction(ctx, "rs", 1, "disable", 0); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.Decrypt(ctx, in); err == nil {
		t.Fatal("a disabled version decrypted")
	}
	// ...nor re-keyed with kmsd's blessing.
	err = hekeys.AttestEvaluation(ctx, e.client(ev), out, "rekey", []*client.Envelope{in}, 1, 1)
	if err == nil {
		if _, derr := admin.Decrypt(ctx, out); derr == nil {
			t.Error("a ciphertext of disabled version 1 was re-keyed, attested and decrypted under version 2")
		} else {
			t.Error("a re-keying from disabled version 1 was attested")
		}
	} else if !strings.Contains(err.Error(), "disabled") {
		t.Errorf("refusal does not say why: %v", err)
	}

	// Version 1 destroyed (crypto-shredded): the same.
	if _, err := admin.VersionAction(ctx, "rs", 1, "schedule-destroy", 1); err != nil {
		t.Fatal(err)
	}
	e.clock.Add(48 * time.Hour)
	if n, err := e.svc.DestroyDue(ctx); n != 1 || err != nil {
		t.Fatalf("DestroyDue = %d, %v", n, err)
	}
	ev2 := mustToken(t, e, "evaluator", "rs")
	err = hekeys.AttestEvaluation(ctx, e.client(ev2), out, "rekey", []*client.Envelope{in}, 1, 1)
	if err == nil {
		if _, derr := admin.Decrypt(ctx, out); derr == nil {
			t.Error("a ciphertext of destroyed (shredded) version 1 was re-keyed, attested and decrypted under version 2")
		} else {
			t.Error("a re-keying from destroyed version 1 was attested")
		}
	}
}

// TestDestroyShredsTheSwitchingKey: README (Re-keying without decryption)
// says destroying version v removes its seed and the switching key's blob
// (owned by v), so that only a copy kept elsewhere, with a later
// compromise of w's secret, could recover v's secret. kmsd must then stop
// serving the blob once v is destroyed.
func TestDestroyShredsTheSwitchingKey(t *testing.T) {
	e := newEnv(t)
	admin := e.client(e.admin)
	heKey(t, e, "sh", `{"name":"sh","kind":"ckks","policy":{"params":"ckks-logn13"}}`)
	if _, err := admin.Rotate(ctx, "sh"); err != nil {
		t.Fatal(err)
	}
	res, err := admin.SwitchingKey(ctx, "sh", 1, 2)
	if err != nil {
		t.Fatal(err)
	}
	path := "/v1/blobs/sha256/" + strings.TrimPrefix(res.SwitchingKey.Digest, "sha256:") + "?form=seeded"
	reader := mustToken(t, e, "worker", "sh")
	if st, _, _ := e.raw("HEAD", path, reader, "", ""); st != 200 {
		t.Fatalf("the switching key before destroy: %d", st)
	}
	if _, err := admin.VersionAction(ctx, "sh", 1, "schedule-destroy", 1); err != nil {
		t.Fatal(err)
	}
	e.clock.Add(48 * time.Hour)
	if n, err := e.svc.DestroyDue(ctx); n != 1 || err != nil {
		t.Fatalf("DestroyDue = %d, %v", n, err)
	}
	reader = mustToken(t, e, "worker", "sh")
	if st, _, b := e.raw("GET", path, reader, "", ""); st != 404 {
		t.Errorf("the switching key of destroyed version 1 is still served: %d (%d bytes)", st, len(b))
	}
	if _, err := e.blobs.Open(ctx, he.Digest(res.SwitchingKey.Digest)); err == nil {
		t.Error("the switching key's blob of destroyed version 1 is still stored")
	}
	// The version's other keys are public and stay; the store stays
	// consistent: version 2 still works.
	if _, err := admin.SwitchingKey(ctx, "sh", 2, 3); err == nil {
		t.Error("a switching key to a version that does not exist")
	}
}

// TestConcurrentSwitchingKeysStayWithinMaxKeyset: the size check of a
// switching key ran on the version read before the version's lock and was
// not repeated under it, so concurrent requests towards different later
// versions each passed it on the same stale count and together took the
// version past --max-keyset-mib.
func TestConcurrentSwitchingKeysStayWithinMaxKeyset(t *testing.T) {
	p, err := he.Resolve(he.CKKS, json.RawMessage(`"ckks-logn13"`))
	if err != nil {
		t.Fatal(err)
	}
	_, _, gk := he.KeySizes(p)
	// Version 1 holds its public key: room for two switching keys more.
	testMaxKeysetBytes = 3 * int64(gk)
	defer func() { testMaxKeysetBytes = 0 }()
	e := newEnv(t)
	admin := e.client(e.admin)
	heKey(t, e, "cs", `{"name":"cs","kind":"ckks","policy":{"params":"ckks-logn13"}}`)
	for range 6 {
		if _, err := admin.Rotate(ctx, "cs"); err != nil {
			t.Fatal(err)
		}
	}
	wc := admin
	var wg sync.WaitGroup
	var ok atomic.Int32
	for to := uint64(2); to <= 7; to++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := wc.SwitchingKey(ctx, "cs", 1, to); err == nil {
				ok.Add(1)
			}
		}()
	}
	wg.Wait()
	v, err := e.store.GetVersion(ctx, "cs", 1)
	if err != nil {
		t.Fatal(err)
	}
	if n := ok.Load(); n > 2 || int64(len(v.Blobs))*int64(gk) > testMaxKeysetBytes {
		t.Errorf("%d concurrent switching keys issued, version 1 holds %d blobs (%d bytes of keys at most), past the limit of %d bytes", n, len(v.Blobs), int64(len(v.Blobs))*int64(gk), testMaxKeysetBytes)
	}
}

// hookSealer runs hook (once) when a secret is unsealed for version
// hookVersion of any key.
type hookSealer struct {
	kms.Sealer
	version uint64
	hook    atomic.Pointer[func()]
}

func (h *hookSealer) Unseal(ctx context.Context, sc kms.SealContext, blob []byte) (kms.Secret, error) {
	if sc.Version == h.version {
		if f := h.hook.Swap(nil); f != nil {
			(*f)()
		}
	}
	return h.Sealer.Unseal(ctx, sc, blob)
}

// TestSwitchingKeyTargetDisabledMeanwhile: the target version's state was
// checked only before the switching key's generation; a version disabled
// (or scheduled for destruction) while the key was made still got a
// switching key listed in the source's signed extension, against the
// policy that keys are issued only towards an enabled version.
func TestSwitchingKeyTargetDisabledMeanwhile(t *testing.T) {
	hs := &hookSealer{version: 2}
	e := newEnvWith(t, func(s kms.Sealer) kms.Sealer { hs.Sealer = s; return hs }, nil, nil)
	admin := e.client(e.admin)
	heKey(t, e, "td", `{"name":"td","kind":"ckks","policy":{"params":"ckks-logn13"}}`)
	for range 2 {
		if _, err := admin.Rotate(ctx, "td"); err != nil {
			t.Fatal(err)
		}
	}
	// Version 2 is disabled while kmsd makes the key from 1 to 2 (when it
	// unseals version 2's secret for it).
	disable := func() {
		if _, err := e.svc.SetVersionState(ctx, "td", 2, kms.ActDisable, 0); err != nil {
			t.Error(err)
		}
	}
	hs.hook.Store(&disable)
	_, err := e.client(e.admin).SwitchingKey(ctx, "td", 1, 2)
	if hs.hook.Load() != nil {
		t.Fatal("the hook did not run")
	}
	v, _ := e.store.GetVersion(ctx, "td", 1)
	if err == nil || v.Extension != nil {
		t.Errorf("a switching key towards version 2, disabled during its generation, was issued (%v) and listed: %s", err, v.Extension)
	}
	if len(v.Blobs) != 1 {
		t.Errorf("version 1 lists %d blobs after the refusal, want its public key alone", len(v.Blobs))
	}
}
