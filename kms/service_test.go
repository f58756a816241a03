package kms_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"

	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/internal/testutil"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/kms/pqc"
	"github.com/kmsd-project/kmsd/store/bolt"
)

func TestMain(m *testing.M) { testhsm.Main(m) }

// countingSealer wraps the real sealer to count calls and inject faults.
type countingSealer struct {
	kms.Sealer
	seals, unseals atomic.Int64
	fail           atomic.Bool
}

var errHSMDown = errors.New("injected: HSM down")

func (c *countingSealer) Seal(ctx context.Context, sc kms.SealContext, p kms.Secret) ([]byte, error) {
	c.seals.Add(1)
	if c.fail.Load() {
		return nil, errHSMDown
	}
	return c.Sealer.Seal(ctx, sc, p)
}

func (c *countingSealer) Unseal(ctx context.Context, sc kms.SealContext, b []byte) (kms.Secret, error) {
	c.unseals.Add(1)
	if c.fail.Load() {
		return kms.Secret{}, errHSMDown
	}
	return c.Sealer.Unseal(ctx, sc, b)
}

// faultStore fails UpdateKey after fn ran (as a failed commit would), counts
// the reads of the hot path and can hold a token read (readcache_test.go).
type faultStore struct {
	kms.Store
	failUpdate atomic.Bool

	getKey, getVersion, getToken, listVersions atomic.Int64
	tokenRead                                  func(t *kms.Token) // called with what GetToken read, before it returns
	keyRead                                    func(name string)  // called after each read of a key's header (GetKey, ListVersions)
}

func (f *faultStore) GetKey(ctx context.Context, name string) (*kms.Key, error) {
	f.getKey.Add(1)
	k, err := f.Store.GetKey(ctx, name)
	if f.keyRead != nil {
		f.keyRead(name)
	}
	return k, err
}

func (f *faultStore) GetVersion(ctx context.Context, name string, n uint64) (*kms.Version, error) {
	f.getVersion.Add(1)
	return f.Store.GetVersion(ctx, name, n)
}

func (f *faultStore) ListVersions(ctx context.Context, name string, before uint64, limit int) (*kms.Key, []*kms.Version, error) {
	f.listVersions.Add(1)
	k, vs, err := f.Store.ListVersions(ctx, name, before, limit)
	if f.keyRead != nil {
		f.keyRead(name)
	}
	return k, vs, err
}

func (f *faultStore) GetToken(ctx context.Context, id string) (*kms.Token, error) {
	f.getToken.Add(1)
	t, err := f.Store.GetToken(ctx, id)
	if err == nil && f.tokenRead != nil {
		f.tokenRead(t)
	}
	return t, err
}

// reads returns and resets the hot-path read counts.
func (f *faultStore) reads() (key, version, token, list int64) {
	return f.getKey.Swap(0), f.getVersion.Swap(0), f.getToken.Swap(0), f.listVersions.Swap(0)
}

func (f *faultStore) UpdateKey(ctx context.Context, name string, fn func(kms.KeyTx) ([]*kms.AuditRecord, error)) error {
	if f.failUpdate.Load() {
		return f.Store.UpdateKey(ctx, name, func(tx kms.KeyTx) ([]*kms.AuditRecord, error) {
			if _, err := fn(tx); err != nil {
				return nil, err
			}
			return nil, errors.New("injected: disk full")
		})
	}
	return f.Store.UpdateKey(ctx, name, fn)
}

type env struct {
	svc    *kms.Service
	clock  *testutil.Clock
	sealer *countingSealer
	store  *faultStore
	rand   *testutil.RecordingRand
	path   string
}

func newEnv(t *testing.T, ttl time.Duration) *env {
	return newEnvCache(t, ttl, 0)
}

// newEnvCache is newEnv with a record cache size (negative: off).
func newEnvCache(t *testing.T, ttl time.Duration, records int) *env {
	t.Helper()
	path := filepath.Join(t.TempDir(), "kms.db")
	st, err := bolt.Open(path, bolt.Options{Sealer: testhsm.Open(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	e := &env{
		clock:  testutil.NewClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)),
		sealer: &countingSealer{Sealer: testhsm.Open(t)},
		store:  &faultStore{Store: st},
		rand:   &testutil.RecordingRand{},
		path:   path,
	}
	e.svc, err = kms.NewService(kms.Config{Store: e.store, Sealer: e.sealer, Kinds: kms.NewRegistry(pqc.Kinds()...), Clock: e.clock, Rand: e.rand, CacheTTL: ttl, RecordCacheSize: records})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

var ctx = context.Background()

// create makes a key or fails the test.
func (e *env) create(t *testing.T, name, kind string, p kms.Policy) *kms.Key {
	t.Helper()
	k, _, err := e.svc.CreateKey(ctx, name, kind, p)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// get returns a key's header and all its versions, oldest first.
func (e *env) get(t *testing.T, name string) (*kms.Key, []*kms.Version) {
	t.Helper()
	k, vs, _, err := e.svc.GetKey(ctx, name, 0, kms.MaxVersionsPage)
	if err != nil {
		t.Fatal(err)
	}
	slices.Reverse(vs)
	return k, vs
}

func must[T any](t *testing.T) func(v T, err error) T {
	return func(v T, err error) T {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}

func TestSignRotateVerify(t *testing.T) {
	e := newEnv(t, 0)
	k := e.create(t, "signer", "ml-dsa-65", kms.Policy{})
	if k.Primary != 1 || k.Policy.DestroyWaitDays != 30 || k.Latest != 1 {
		t.Fatalf("new key: %+v", k)
	}
	msg := []byte("message")
	sig1, v1, err := e.svc.Sign(ctx, "signer", msg, nil)
	if err != nil || v1 != 1 {
		t.Fatalf("sign: v%d %v", v1, err)
	}
	_, pub1, _ := e.svc.PublicKey(ctx, "signer", 1)
	var pk mldsa65.PublicKey
	if err := pk.UnmarshalBinary(pub1.PublicKey); err != nil {
		t.Fatal(err)
	}
	if !mldsa65.Verify(&pk, msg, nil, sig1) {
		t.Fatal("circl does not verify the service's signature")
	}
	if _, _, err := e.svc.Rotate(ctx, "signer"); err != nil {
		t.Fatal(err)
	}
	sig2, v2, _ := e.svc.Sign(ctx, "signer", msg, nil)
	if v2 != 2 {
		t.Fatalf("signed with v%d after rotation", v2)
	}
	for _, c := range []struct {
		v    uint64
		sig  []byte
		want bool
	}{{1, sig1, true}, {2, sig2, true}, {1, sig2, false}, {2, sig1, false}} {
		ok, err := e.svc.Verify(ctx, "signer", c.v, msg, nil, c.sig)
		if err != nil || ok != c.want {
			t.Errorf("verify v%d: %v %v, want %v", c.v, ok, err, c.want)
		}
	}
	if _, err := e.svc.SetVersionState(ctx, "signer", 1, kms.ActDisable, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := e.svc.Verify(ctx, "signer", 1, msg, nil, sig1); !errors.Is(err, kms.ErrFailedPrecondition) {
		t.Fatalf("verify with a disabled version: %v", err)
	}
}

// TestRotationFailureChangesNothing: an HSM failure while sealing, or a store
// failure while committing, leaves the key exactly as it was.
func TestRotationFailureChangesNothing(t *testing.T) {
	e := newEnv(t, 0)
	before, beforeVs := e.get(t, e.create(t, "k", "ml-kem-768", kms.Policy{}).Name)
	e.sealer.fail.Store(true)
	if _, _, err := e.svc.Rotate(ctx, "k"); !errors.Is(err, kms.ErrUnavailable) {
		t.Fatalf("rotate with the HSM down: %v, want unavailable", err)
	}
	e.sealer.fail.Store(false)
	e.store.failUpdate.Store(true)
	if _, _, err := e.svc.Rotate(ctx, "k"); !errors.Is(err, kms.ErrUnavailable) {
		t.Fatalf("rotate with a failing commit: %v, want unavailable", err)
	}
	e.store.failUpdate.Store(false)
	after, afterVs := e.get(t, "k")
	if after.Primary != before.Primary || after.Latest != 1 || len(afterVs) != 1 || !bytes.Equal(afterVs[0].Sealed, beforeVs[0].Sealed) {
		t.Fatalf("key changed by failed rotations: %+v", after)
	}
	if _, v, err := e.svc.Rotate(ctx, "k"); err != nil || v.Number != 2 {
		t.Fatalf("rotate after recovery: %v", err)
	}
}

func TestScheduledDestroyShredsMaterial(t *testing.T) {
	e := newEnv(t, 0)
	e.create(t, "k", "ml-kem-768", kms.Policy{DestroyWaitDays: 7})
	e.svc.Rotate(ctx, "k")
	if _, err := e.svc.SetVersionState(ctx, "k", 2, kms.ActScheduleDestroy, 0); !errors.Is(err, kms.ErrFailedPrecondition) {
		t.Fatalf("destroying the primary: %v", err)
	}
	v := must[*kms.Version](t)(e.svc.SetVersionState(ctx, "k", 1, kms.ActScheduleDestroy, 0))
	if v.State != kms.StateDestroyScheduled || !v.DestroyAt.Equal(e.clock.Now().Add(7*24*time.Hour)) {
		t.Fatalf("scheduled: %+v", v)
	}
	e.clock.Add(7*24*time.Hour - time.Second)
	if n, err := e.svc.DestroyDue(ctx); n != 0 || err != nil {
		t.Fatalf("destroyed %d before the time, %v", n, err)
	}
	e.clock.Add(time.Second)
	if n, err := e.svc.DestroyDue(ctx); n != 1 || err != nil {
		t.Fatalf("DestroyDue = %d, %v; want 1", n, err)
	}
	_, vs := e.get(t, "k")
	if vs[0].State != kms.StateDestroyed || vs[0].Sealed != nil || vs[0].DestroyedAt == nil {
		t.Fatalf("version 1 after destroy: %+v", vs[0])
	}
	if vs[1].Sealed == nil {
		t.Fatal("version 2 lost its material")
	}
	if _, err := e.svc.Decapsulate(ctx, "k", 1, make([]byte, 1088)); !errors.Is(err, kms.ErrFailedPrecondition) {
		t.Fatalf("decapsulate with a destroyed version: %v", err)
	}
	for _, a := range []kms.Action{kms.ActEnable, kms.ActCancelDestroy, kms.ActDisable, kms.ActScheduleDestroy} {
		if _, err := e.svc.SetVersionState(ctx, "k", 1, a, 0); !errors.Is(err, kms.ErrFailedPrecondition) {
			t.Errorf("%s on a destroyed version: %v", a, err)
		}
	}
}

func TestCancelDestroyRestoresDisabled(t *testing.T) {
	e := newEnv(t, 0)
	e.create(t, "k", "ml-dsa-44", kms.Policy{})
	e.svc.Rotate(ctx, "k")
	e.svc.SetVersionState(ctx, "k", 1, kms.ActScheduleDestroy, 3)
	v := must[*kms.Version](t)(e.svc.SetVersionState(ctx, "k", 1, kms.ActCancelDestroy, 0))
	if v.State != kms.StateDisabled || v.DestroyAt != nil {
		t.Fatalf("after cancel: %+v", v)
	}
	e.clock.Add(400 * 24 * time.Hour)
	if n, _ := e.svc.DestroyDue(ctx); n != 0 {
		t.Fatal("a cancelled destroy still happened")
	}
	if _, err := e.svc.SetVersionState(ctx, "k", 1, kms.ActEnable, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := e.svc.SetVersionState(ctx, "k", 1, kms.ActScheduleDestroy, 366); !errors.Is(err, kms.ErrInvalid) {
		t.Fatalf("366 days: %v", err)
	}
}

// TestNoSeedInStoreFile: the bbolt file holds no generated seed in plaintext.
func TestNoSeedInStoreFile(t *testing.T) {
	e := newEnv(t, 0)
	for i, kind := range []string{"ml-kem-512", "ml-kem-768", "ml-kem-1024", "ml-dsa-44", "ml-dsa-65", "ml-dsa-87"} {
		name := "k" + string(rune('a'+i))
		e.create(t, name, kind, kms.Policy{})
		e.svc.Rotate(ctx, name)
	}
	db, err := os.ReadFile(e.path)
	if err != nil {
		t.Fatal(err)
	}
	seeds := 0
	for _, b := range e.rand.Taken() {
		if len(b) != 32 && len(b) != 64 {
			continue
		}
		seeds++
		// Look for the seed and each 16-byte window of it.
		for off := 0; off+16 <= len(b); off += 8 {
			if bytes.Contains(db, b[off:off+16]) {
				t.Fatalf("bytes %d-%d of a %d-byte seed appear in the store file", off, off+16, len(b))
			}
		}
	}
	if seeds < 12 {
		t.Fatalf("saw %d seeds, want at least 12", seeds)
	}
}

// TestUnsealCacheTTL: a hot key costs one unseal per TTL.
func TestUnsealCacheTTL(t *testing.T) {
	e := newEnv(t, time.Minute)
	e.create(t, "k", "ml-dsa-65", kms.Policy{})
	for i := 0; i < 5; i++ {
		if _, _, err := e.svc.Sign(ctx, "k", []byte("m"), nil); err != nil {
			t.Fatal(err)
		}
	}
	if n := e.sealer.unseals.Load(); n != 1 {
		t.Fatalf("%d unseals for 5 signs within the TTL, want 1", n)
	}
	e.clock.Add(time.Minute)
	e.svc.Sign(ctx, "k", []byte("m"), nil)
	if n := e.sealer.unseals.Load(); n != 2 {
		t.Fatalf("%d unseals after the TTL passed, want 2", n)
	}
	// The HSM going down does not stop a cached key, but an expired one fails
	// with unavailable, not a wrong answer.
	e.sealer.fail.Store(true)
	if _, _, err := e.svc.Sign(ctx, "k", []byte("m"), nil); err != nil {
		t.Fatalf("cached sign with the HSM down: %v", err)
	}
	e.clock.Add(time.Minute)
	if _, _, err := e.svc.Sign(ctx, "k", []byte("m"), nil); !errors.Is(err, kms.ErrUnavailable) {
		t.Fatalf("uncached sign with the HSM down: %v", err)
	}
}

func TestCacheOff(t *testing.T) {
	e := newEnv(t, -1)
	e.create(t, "k", "ml-dsa-65", kms.Policy{})
	for i := 0; i < 3; i++ {
		e.svc.Sign(ctx, "k", []byte("m"), nil)
	}
	if n := e.sealer.unseals.Load(); n != 3 {
		t.Fatalf("%d unseals with the cache off, want 3", n)
	}
}

func TestPolicyAndMinDecryptionVersion(t *testing.T) {
	e := newEnv(t, 0)
	if _, _, err := e.svc.CreateKey(ctx, "k", "ml-dsa-65", kms.Policy{AllowedOperations: []kms.Operation{kms.OpDecapsulate}}); !errors.Is(err, kms.ErrInvalid) {
		t.Fatalf("decapsulate on a signing key: %v", err)
	}
	e.create(t, "k", "ml-dsa-65", kms.Policy{AllowedOperations: []kms.Operation{kms.OpVerify}})
	if _, _, err := e.svc.Sign(ctx, "k", []byte("m"), nil); !errors.Is(err, kms.ErrFailedPrecondition) {
		t.Fatalf("sign when the policy allows only verify: %v", err)
	}
	e.svc.UpdateKey(ctx, "k", kms.KeyUpdate{PatchPolicy: func(p kms.Policy) (kms.Policy, error) { return kms.Policy{}, nil }})
	sig, _, err := e.svc.Sign(ctx, "k", []byte("m"), nil)
	if err != nil {
		t.Fatal(err)
	}
	e.svc.Rotate(ctx, "k")
	three := uint64(3)
	if _, err := e.svc.UpdateKey(ctx, "k", kms.KeyUpdate{MinDecryptionVersion: &three}); !errors.Is(err, kms.ErrInvalid) {
		t.Fatalf("min_decryption_version above primary: %v", err)
	}
	two := uint64(2)
	e.svc.UpdateKey(ctx, "k", kms.KeyUpdate{MinDecryptionVersion: &two})
	if _, err := e.svc.Verify(ctx, "k", 1, []byte("m"), nil, sig); !errors.Is(err, kms.ErrFailedPrecondition) {
		t.Fatalf("verify below min_decryption_version: %v", err)
	}
}

func TestConcurrentRotations(t *testing.T) {
	e := newEnv(t, 0)
	e.create(t, "k", "ml-dsa-44", kms.Policy{})
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, _, err := e.svc.Rotate(ctx, "k"); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	k, vs := e.get(t, "k")
	if len(vs) != 9 || k.Primary != 9 || k.Latest != 9 {
		t.Fatalf("%d versions, primary %d; want 9, 9", len(vs), k.Primary)
	}
	for n := uint64(1); n <= 9; n++ {
		// Every version's blob opens under its own number.
		if _, _, err := e.svc.PublicKey(ctx, "k", n); err != nil {
			t.Fatal(err)
		}
	}
	e.svc.SetVersionState(ctx, "k", 9, kms.ActDisable, 0) // refused: primary
	for n := uint64(1); n <= 8; n++ {
		if _, err := e.svc.SetVersionState(ctx, "k", n, kms.ActDisable, 0); err != nil {
			t.Fatal(err)
		}
	}
}

func TestListKeysPaginatesAndHidesIdentity(t *testing.T) {
	e := newEnv(t, 0)
	if err := e.svc.EnsureIdentity(ctx); err != nil {
		t.Fatal(err)
	}
	names := []string{"0a", "0b", "a", "b", "c"}
	for _, n := range names {
		e.create(t, n, "ml-kem-512", kms.Policy{})
	}
	var got []string
	after := ""
	for pages := 0; ; pages++ {
		keys, next, err := e.svc.ListKeys(ctx, after, 2, nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range keys {
			got = append(got, k.Name)
		}
		if next == "" {
			break
		}
		after = next
		if pages > 5 {
			t.Fatal("pagination does not end")
		}
	}
	if len(got) != len(names) {
		t.Fatalf("listed %v, want %v", got, names)
	}
	for i := range got {
		if got[i] != names[i] {
			t.Fatalf("listed %v, want %v", got, names)
		}
	}
	if _, _, _, err := e.svc.GetKey(ctx, kms.IdentityKeyName, 0, 1); !errors.Is(err, kms.ErrInvalid) {
		t.Fatalf("GetKey of the identity key: %v", err)
	}
	v, pub, err := e.svc.Identity(ctx)
	if err != nil || v != 1 || len(pub) != mldsa65.PublicKeySize {
		t.Fatalf("Identity: %d %d %v", v, len(pub), err)
	}
}

func TestTokens(t *testing.T) {
	e := newEnv(t, 0)
	var admin string
	made, err := e.svc.EnsureAdminToken(ctx, func(tok string) error { admin = tok; return nil })
	if err != nil || !made || admin == "" {
		t.Fatal(err)
	}
	if p, err := e.svc.Authenticate(ctx, admin); err != nil || p.Role != kms.RoleAdmin {
		t.Fatalf("the bootstrap admin token does not authenticate: %v", err)
	}
	if again, _ := e.svc.EnsureAdminToken(ctx, func(string) error { t.Fatal("persist called again"); return nil }); again {
		t.Fatal("a second admin token was made")
	}
	root, err := e.svc.Authenticate(ctx, admin)
	if err != nil {
		t.Fatal(err)
	}
	tok, rec, err := e.svc.CreateToken(ctx, root, kms.TokenRequest{Name: "w", Role: kms.RoleWorker, Keys: []string{"team-a-*"}})
	if err != nil {
		t.Fatal(err)
	}
	db, _ := os.ReadFile(e.path)
	if bytes.Contains(db, []byte(tok)) || bytes.Contains(db, []byte(tok[len(tok)-20:])) {
		t.Fatal("the token is stored in plaintext")
	}
	p, err := e.svc.Authenticate(ctx, tok)
	if err != nil || p.Role != kms.RoleWorker || p.TokenID != rec.ID {
		t.Fatalf("Authenticate: %+v %v", p, err)
	}
	if err := p.Authorize(kms.PermReadKey, "team-a-1"); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		perm kms.Permission
		key  string
	}{{kms.PermReadKey, "team-b-1"}, {kms.PermUseKey, "team-a-1"}, {kms.PermManageKey, "team-a-1"}, {kms.PermManageTokens, ""}} {
		if err := p.Authorize(c.perm, c.key); !errors.Is(err, kms.ErrPermissionDenied) {
			t.Errorf("worker %s on %q: %v", c.perm, c.key, err)
		}
	}
	for _, bad := range []string{"", "kms_", tok + "x", tok[:len(tok)-1], "Bearer " + tok, admin[:20] + tok[20:]} {
		if _, err := e.svc.Authenticate(ctx, bad); !errors.Is(err, kms.ErrUnauthenticated) {
			t.Errorf("Authenticate(%q) = %v", bad, err)
		}
	}
	if _, _, err := e.svc.CreateToken(ctx, root, kms.TokenRequest{Name: "x", Role: "root", Keys: []string{"*"}}); !errors.Is(err, kms.ErrInvalid) {
		t.Fatalf("unknown role: %v", err)
	}
	// A pasted token (or any character no key name holds) is no pattern:
	// refused without being echoed or stored.
	for _, bad := range []string{admin, "Team-*", "team a", "k/*", "k\x00"} {
		before, _ := e.store.CountTokens(ctx)
		_, _, err := e.svc.CreateToken(ctx, root, kms.TokenRequest{Role: kms.RoleWorker, Keys: []string{bad}})
		if !errors.Is(err, kms.ErrInvalid) || strings.Contains(err.Error(), bad) {
			t.Fatalf("pattern %q: %v", bad, err)
		}
		if after, _ := e.store.CountTokens(ctx); after != before {
			t.Fatalf("pattern %q: a token was stored", bad)
		}
	}
	if _, _, err := e.svc.CreateToken(ctx, root, kms.TokenRequest{Name: "x", Role: kms.RoleWorker, Keys: []string{"["}}); !errors.Is(err, kms.ErrInvalid) {
		t.Fatalf("malformed pattern: %v", err)
	}
}

// TestTokenSubsetRule: a token creates only tokens within itself. The
// review's escalation (an admin for team-a-* minting an admin for *) is the
// first refusal.
func TestTokenSubsetRule(t *testing.T) {
	e := newEnv(t, 0)
	now := e.clock.Now()
	in := func(d time.Duration) *time.Time { x := now.Add(d); return &x }
	cases := []struct {
		name    string
		creator kms.Principal
		req     kms.TokenRequest
		want    error // nil: created
	}{
		{"escalation to all keys", kms.Principal{Role: kms.RoleAdmin, Keys: []string{"team-a-*"}}, kms.TokenRequest{Role: kms.RoleAdmin, Keys: []string{"*"}}, kms.ErrPermissionDenied},
		{"sibling team", kms.Principal{Role: kms.RoleAdmin, Keys: []string{"team-a-*"}}, kms.TokenRequest{Role: kms.RoleWorker, Keys: []string{"team-b-*"}}, kms.ErrPermissionDenied},
		{"prefix without the dash", kms.Principal{Role: kms.RoleAdmin, Keys: []string{"team-a-*"}}, kms.TokenRequest{Role: kms.RoleWorker, Keys: []string{"team-a*"}}, kms.ErrPermissionDenied},
		{"wildcard in the middle", kms.Principal{Role: kms.RoleAdmin, Keys: []string{"team-a-*"}}, kms.TokenRequest{Role: kms.RoleWorker, Keys: []string{"team-?-x"}}, kms.ErrPermissionDenied},
		{"one pattern of two outside", kms.Principal{Role: kms.RoleAdmin, Keys: []string{"team-a-*"}}, kms.TokenRequest{Role: kms.RoleWorker, Keys: []string{"team-a-1", "team-b-1"}}, kms.ErrPermissionDenied},
		{"same scope", kms.Principal{Role: kms.RoleAdmin, Keys: []string{"team-a-*"}}, kms.TokenRequest{Role: kms.RoleAdmin, Keys: []string{"team-a-*"}}, nil},
		{"narrower scope", kms.Principal{Role: kms.RoleAdmin, Keys: []string{"team-a-*"}}, kms.TokenRequest{Role: kms.RoleWorker, Keys: []string{"team-a-prod-*", "team-a-1"}}, nil},
		{"covered by a union", kms.Principal{Role: kms.RoleAdmin, Keys: []string{"team-a-x*", "team-a-y*"}}, kms.TokenRequest{Role: kms.RoleDecryptor, Keys: []string{"team-a-[xy]*"}}, nil},
		{"scoped auditor refused", kms.Principal{Role: kms.RoleAdmin, Keys: []string{"*"}}, kms.TokenRequest{Role: kms.RoleAuditor, Keys: []string{"team-a-*"}}, kms.ErrInvalid},
		{"auditor for all", kms.Principal{Role: kms.RoleAdmin, Keys: []string{"*"}}, kms.TokenRequest{Role: kms.RoleAuditor, Keys: []string{"*"}}, nil},
		{"auditor by a scoped admin", kms.Principal{Role: kms.RoleAdmin, Keys: []string{"team-a-*"}}, kms.TokenRequest{Role: kms.RoleAuditor, Keys: []string{"*"}}, kms.ErrPermissionDenied},
		{"decryptor creating an evaluator (which may introspect tokens)", kms.Principal{Role: kms.RoleDecryptor, Keys: []string{"*"}}, kms.TokenRequest{Role: kms.RoleEvaluator, Keys: []string{"x"}}, kms.ErrPermissionDenied},
		{"decryptor creating an admin", kms.Principal{Role: kms.RoleDecryptor, Keys: []string{"*"}}, kms.TokenRequest{Role: kms.RoleAdmin, Keys: []string{"x"}}, kms.ErrPermissionDenied},
		{"worker creating a decryptor", kms.Principal{Role: kms.RoleWorker, Keys: []string{"*"}}, kms.TokenRequest{Role: kms.RoleDecryptor, Keys: []string{"x"}}, kms.ErrPermissionDenied},
		{"auditor creating a worker", kms.Principal{Role: kms.RoleAuditor, Keys: []string{"*"}}, kms.TokenRequest{Role: kms.RoleWorker, Keys: []string{"x"}}, kms.ErrPermissionDenied},
		{"outliving the creator", kms.Principal{Role: kms.RoleAdmin, Keys: []string{"*"}, ExpiresAt: in(time.Hour)}, kms.TokenRequest{Role: kms.RoleWorker, Keys: []string{"x"}, TTL: 2 * time.Hour}, kms.ErrPermissionDenied},
		{"within the creator's life", kms.Principal{Role: kms.RoleAdmin, Keys: []string{"*"}, ExpiresAt: in(time.Hour)}, kms.TokenRequest{Role: kms.RoleWorker, Keys: []string{"x"}, TTL: 30 * time.Minute}, nil},
		{"no ttl under an expiring creator", kms.Principal{Role: kms.RoleAdmin, Keys: []string{"*"}, ExpiresAt: in(time.Hour)}, kms.TokenRequest{Role: kms.RoleWorker, Keys: []string{"x"}}, nil},
		{"ttl below a second", kms.Principal{Role: kms.RoleAdmin, Keys: []string{"*"}}, kms.TokenRequest{Role: kms.RoleWorker, Keys: []string{"x"}, TTL: time.Millisecond}, kms.ErrInvalid},
	}
	for _, c := range cases {
		before, _ := e.store.CountTokens(ctx)
		_, tok, err := e.svc.CreateToken(ctx, &c.creator, c.req)
		after, _ := e.store.CountTokens(ctx)
		if c.want == nil {
			if err != nil {
				t.Errorf("%s: %v", c.name, err)
				continue
			}
			if c.creator.ExpiresAt != nil && (tok.ExpiresAt == nil || tok.ExpiresAt.After(*c.creator.ExpiresAt)) {
				t.Errorf("%s: expires %v, after its creator (%v)", c.name, tok.ExpiresAt, c.creator.ExpiresAt)
			}
			continue
		}
		if !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
		if after != before {
			t.Errorf("%s: a refused create stored a token", c.name)
		}
	}
}

// TestTokenRevokeAndExpire: a revoked token is refused at once; an expired
// one with KindExpired; the server's maximum lifetime is the default and
// the bound; the last admin token for all keys cannot be revoked.
func TestTokenRevokeAndExpire(t *testing.T) {
	svc, st, clock, admin := tokenService(t)
	root, err := svc.Authenticate(ctx, admin)
	if err != nil || root.ExpiresAt != nil {
		t.Fatalf("bootstrap admin: %+v %v", root, err)
	}
	if _, _, err := svc.CreateToken(ctx, root, kms.TokenRequest{Role: kms.RoleWorker, Keys: []string{"*"}, TTL: 25 * time.Hour}); !errors.Is(err, kms.ErrInvalid) {
		t.Fatalf("ttl over the maximum: %v", err)
	}
	wtok, w, err := svc.CreateToken(ctx, root, kms.TokenRequest{Role: kms.RoleWorker, Keys: []string{"*"}})
	if err != nil || w.ExpiresAt == nil || !w.ExpiresAt.Equal(clock.Now().Add(24*time.Hour)) || w.CreatedBy != root.TokenID {
		t.Fatalf("default lifetime: %+v %v", w, err)
	}
	clock.Add(24*time.Hour - time.Second)
	if _, err := svc.Authenticate(ctx, wtok); err != nil {
		t.Fatalf("a second before expiry: %v", err)
	}
	clock.Add(time.Second)
	if _, err := svc.Authenticate(ctx, wtok); !errors.Is(err, kms.ErrExpired) || kms.KindOf(err) != kms.KindExpired {
		t.Fatalf("at expiry: %v", err)
	}
	// The only admin token for all keys cannot go.
	if _, err := svc.RevokeToken(ctx, root, root.TokenID); !errors.Is(err, kms.ErrFailedPrecondition) {
		t.Fatalf("revoking the last root admin: %v", err)
	}
	// An expired admin does not count as the one that remains.
	clock.Add(24 * time.Hour)
	_, a2, err := svc.CreateToken(ctx, root, kms.TokenRequest{Role: kms.RoleAdmin, Keys: []string{"*"}, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	clock.Add(2 * time.Hour)
	if _, err := svc.RevokeToken(ctx, root, root.TokenID); !errors.Is(err, kms.ErrFailedPrecondition) {
		t.Fatalf("revoking the root admin beside an expired one: %v", err)
	}
	a3tok, a3, err := svc.CreateToken(ctx, root, kms.TokenRequest{Role: kms.RoleAdmin, Keys: []string{"*"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := svc.RevokeToken(ctx, root, root.TokenID); err != nil {
		t.Fatalf("revoking the bootstrap admin while another exists: %v", err)
	}
	if _, err := svc.Authenticate(ctx, admin); !errors.Is(err, kms.ErrUnauthenticated) {
		t.Fatalf("revoked token: %v", err)
	}
	p3, err := svc.Authenticate(ctx, a3tok)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := svc.RevokeToken(ctx, p3, a3.ID); !errors.Is(err, kms.ErrFailedPrecondition) {
		t.Fatalf("revoking the new last root admin: %v", err)
	}
	if _, err := svc.RevokeToken(ctx, p3, root.TokenID); !errors.Is(err, kms.ErrFailedPrecondition) {
		t.Fatalf("revoking twice: %v", err)
	}
	// A scoped admin sees and revokes only what is within it.
	stok, _, err := svc.CreateToken(ctx, p3, kms.TokenRequest{Role: kms.RoleAdmin, Keys: []string{"team-a-*"}})
	if err != nil {
		t.Fatal(err)
	}
	sp, _ := svc.Authenticate(ctx, stok)
	if _, err := svc.GetToken(ctx, sp, a3.ID); !errors.Is(err, kms.ErrNotFound) {
		t.Fatalf("a scoped admin reads a root token: %v", err)
	}
	if _, err := svc.RevokeToken(ctx, sp, a3.ID); !errors.Is(err, kms.ErrNotFound) {
		t.Fatalf("a scoped admin revokes a root token: %v", err)
	}
	list, _, err := svc.ListTokens(ctx, sp, "", 100)
	if err != nil || len(list) != 1 || list[0].ID != sp.TokenID {
		t.Fatalf("a scoped admin's list: %+v %v", list, err)
	}
	all, _, err := svc.ListTokens(ctx, p3, "", 2)
	if err != nil || len(all) != 2 {
		t.Fatalf("list page: %d %v", len(all), err)
	}
	// Last use is remembered, and written down by FlushTokenUse.
	if err := svc.FlushTokenUse(ctx); err != nil {
		t.Fatal(err)
	}
	got, err := st.GetToken(ctx, a3.ID)
	if err != nil || got.LastUsedAt == nil || !got.LastUsedAt.Equal(clock.Now()) {
		t.Fatalf("last use of a3: %+v %v", got, err)
	}
	_ = a2
}

// TestCallCarriesTheAuditRecord: a request's audit record is an explicit
// part of its call (Service.For), not a value in its context: a rotation
// through For(rec) commits rec with the change, completed with the key
// and the new version; the Service's own Rotate commits none.
func TestCallCarriesTheAuditRecord(t *testing.T) {
	e := newEnv(t, time.Minute)
	if _, _, err := e.svc.CreateKey(ctx, "audited", "ml-dsa-44", kms.Policy{}); err != nil {
		t.Fatal(err)
	}
	log := e.store.Store.(*bolt.Store).Audit()
	before, err := log.AuditSize(ctx)
	if err != nil {
		t.Fatal(err)
	}
	rec := &kms.AuditRecord{Time: "2026-01-01T00:00:00Z", Actor: "0123456789abcdef", Operation: "POST /v1/keys/{name}/rotate", Status: 201}
	if _, v, err := e.svc.For(rec).Rotate(ctx, "audited"); err != nil || v.Number != 2 {
		t.Fatalf("rotate: %v", err)
	}
	if !rec.Committed || rec.Key != "audited" || rec.Version != 2 {
		t.Fatalf("the record after the rotation: %+v", rec)
	}
	if _, _, err := e.svc.Rotate(ctx, "audited"); err != nil {
		t.Fatal(err)
	}
	after, err := log.AuditSize(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if after != before+1 {
		t.Fatalf("the log grew by %d records, want 1 (the call's)", after-before)
	}
	recs, err := log.AuditRecords(ctx, before, after)
	if err != nil {
		t.Fatal(err)
	}
	r, err := kms.DecodeAuditRecord(recs[0])
	if err != nil || r.Key != "audited" || r.Version != 2 || r.Operation != rec.Operation {
		t.Fatalf("the committed record: %+v %v", r, err)
	}
}

// TestTokenRenewal: a renewable token renews by its ttl up to creation +
// max_lifetime (the server's maximum lifetime bounds max_lifetime), an
// expired one cannot come back, and renewal is what the token asks for
// itself.
func TestTokenRenewal(t *testing.T) {
	svc, _, clock, admin := tokenService(t)
	root, err := svc.Authenticate(ctx, admin)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := svc.CreateToken(ctx, root, kms.TokenRequest{Role: kms.RoleWorker, Keys: []string{"*"}, TTL: time.Hour, MaxLifetime: 25 * time.Hour}); !errors.Is(err, kms.ErrInvalid) {
		t.Fatalf("max_lifetime over the server's maximum: %v", err)
	}
	tok, w, err := svc.CreateToken(ctx, root, kms.TokenRequest{Role: kms.RoleWorker, Keys: []string{"*"}, TTL: time.Hour, MaxLifetime: 3 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	born := clock.Now()
	p, err := svc.Authenticate(ctx, tok)
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []time.Duration{90 * time.Minute, 120 * time.Minute, 150 * time.Minute, 3 * time.Hour} {
		clock.Add(30 * time.Minute)
		got, err := svc.For(nil).RenewToken(ctx, p)
		if err != nil || !got.ExpiresAt.Equal(born.Add(want)) || got.RenewedAt == nil {
			t.Fatalf("renewal %d: %+v %v, want expiry at +%v", i+1, got, err, want)
		}
	}
	clock.Add(30 * time.Minute)
	if _, err := svc.For(nil).RenewToken(ctx, p); !errors.Is(err, kms.ErrFailedPrecondition) {
		t.Fatalf("a renewal at the maximum lifetime: %v", err)
	}
	clock.Add(2 * time.Hour)
	if _, err := svc.Authenticate(ctx, tok); !errors.Is(err, kms.ErrExpired) {
		t.Fatalf("past its maximum lifetime: %v", err)
	}
	if _, err := svc.For(nil).RenewToken(ctx, p); kms.KindOf(err) != kms.KindExpired {
		t.Fatalf("an expired token renewed: %v", err)
	}
	if w.TTL != time.Hour || !w.MaxExpiresAt.Equal(born.Add(3*time.Hour)) {
		t.Fatalf("the token as made: %+v", w)
	}
}

// tokenService is a service on a fresh bbolt store (returned too) with a fake clock, a
// maximum token lifetime of a day, and its bootstrap admin token.
func tokenService(t *testing.T) (*kms.Service, *bolt.Store, *testutil.Clock, string) {
	t.Helper()
	st, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: testhsm.Open(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	clock := testutil.NewClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	svc, err := kms.NewService(kms.Config{Store: st, Sealer: testhsm.Open(t), Kinds: kms.NewRegistry(pqc.Kinds()...), Clock: clock, MaxTokenTTL: 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	var admin string
	if _, err := svc.EnsureAdminToken(ctx, func(tok string) error { admin = tok; return nil }); err != nil {
		t.Fatal(err)
	}
	return svc, st, clock, admin
}

// TestGetKeyIsOneSnapshot is issue 24's first defect: GET /v1/keys/{name}
// read the header and the versions in two reads, so a rotation committed
// between them (another replica's) gave an answer listing a version newer
// than the header's latest_version and primary. A rotation now lands
// right after the first read of the key's records: the answer is either
// wholly before it or wholly after.
func TestGetKeyIsOneSnapshot(t *testing.T) {
	e := newEnv(t, 0)
	e.create(t, "k", "ml-dsa-65", kms.Policy{})
	var rotated atomic.Bool
	e.store.keyRead = func(name string) {
		if rotated.CompareAndSwap(false, true) { // the rotation's own reads pass
			if _, _, err := e.svc.Rotate(ctx, name); err != nil {
				t.Error(err)
			}
		}
	}
	k, vs, _, err := e.svc.GetKey(ctx, "k", 0, kms.MaxVersionsPage)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range vs {
		if v.Number > k.Latest || v.Number > k.Primary && k.Primary == k.Latest && v.Number != k.Latest {
			t.Fatalf("a torn read: header latest %d primary %d with version %d", k.Latest, k.Primary, v.Number)
		}
	}
	if len(vs) != int(k.Latest) {
		t.Fatalf("header latest %d with %d versions", k.Latest, len(vs))
	}
}
