package kms_test

import (
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/kms"
)

// TestHotPathReadsOneVersion: with the record cache off, a sign, a verify,
// a decapsulation and a public-key read each read the key's header and the
// one version they use, whatever the key's history; with it on, repeated
// requests read nothing from the store.
func TestHotPathReadsOneVersion(t *testing.T) {
	for _, records := range []int{-1, 0} {
		e := newEnvCache(t, 0, records)
		e.create(t, "sig", "ml-dsa-44", kms.Policy{})
		e.create(t, "kem", "ml-kem-512", kms.Policy{})
		for i := 0; i < 30; i++ {
			if _, _, err := e.svc.Rotate(ctx, "sig"); err != nil {
				t.Fatal(err)
			}
		}
		sig, _, err := e.svc.Sign(ctx, "sig", []byte("m"), nil) // warms the unsealed-key cache and the record cache
		if err != nil {
			t.Fatal(err)
		}
		e.svc.Verify(ctx, "sig", 31, []byte("m"), nil, sig)
		e.svc.PublicKey(ctx, "sig", 7)
		e.svc.Decapsulate(ctx, "kem", 1, make([]byte, 768))
		e.store.reads()
		const n = 5
		for i := 0; i < n; i++ {
			if _, v, err := e.svc.Sign(ctx, "sig", []byte("m"), nil); err != nil || v != 31 {
				t.Fatalf("sign: v%d %v", v, err)
			}
			if ok, err := e.svc.Verify(ctx, "sig", 31, []byte("m"), nil, sig); err != nil || !ok {
				t.Fatalf("verify: %v %v", ok, err)
			}
			if _, _, err := e.svc.PublicKey(ctx, "sig", 7); err != nil {
				t.Fatal(err)
			}
			if _, err := e.svc.Decapsulate(ctx, "kem", 1, make([]byte, 768)); err != nil {
				t.Fatal(err)
			}
		}
		key, version, _, list := e.store.reads()
		want := int64(4 * n) // cache off: one header and one version per request
		if records >= 0 {
			want = 0
		}
		if key != want || version != want || list != 0 {
			t.Fatalf("record cache %d: %d requests read %d headers, %d versions and listed %d times; want %d, %d, 0", records, 4*n, key, version, list, want, want)
		}
	}
}

// TestCacheFollowsChanges: every change is seen by the next request: a
// rotation moves signing to the new version, a disabled version is
// refused, a policy change applies, a revoked token is refused, a destroyed
// version is refused.
func TestCacheFollowsChanges(t *testing.T) {
	e := newEnv(t, 0)
	e.create(t, "k", "ml-dsa-44", kms.Policy{DestroyWaitDays: 1})
	for i := 0; i < 3; i++ {
		if _, v, err := e.svc.Sign(ctx, "k", []byte("m"), nil); err != nil || v != uint64(i+1) {
			t.Fatalf("sign after %d rotations: v%d %v", i, v, err)
		}
		if _, _, err := e.svc.Rotate(ctx, "k"); err != nil {
			t.Fatal(err)
		}
	}
	e.svc.PublicKey(ctx, "k", 1) // cached as enabled
	if _, err := e.svc.SetVersionState(ctx, "k", 1, kms.ActDisable, 0); err != nil {
		t.Fatal(err)
	}
	if _, _, err := e.svc.PublicKey(ctx, "k", 1); !errors.Is(err, kms.ErrFailedPrecondition) {
		t.Fatalf("public key of a version just disabled: %v", err)
	}
	e.svc.PublicKey(ctx, "k", 2)
	if _, err := e.svc.SetVersionState(ctx, "k", 2, kms.ActScheduleDestroy, 0); err != nil {
		t.Fatal(err)
	}
	e.clock.Add(25 * time.Hour)
	if n, err := e.svc.DestroyDue(ctx); n != 1 || err != nil {
		t.Fatalf("DestroyDue = %d %v", n, err)
	}
	if _, _, err := e.svc.PublicKey(ctx, "k", 2); !errors.Is(err, kms.ErrFailedPrecondition) {
		t.Fatalf("public key of a destroyed version: %v", err)
	}
	e.svc.Sign(ctx, "k", []byte("m"), nil)
	if _, err := e.svc.UpdateKey(ctx, "k", kms.KeyUpdate{PatchPolicy: func(p kms.Policy) (kms.Policy, error) {
		p.AllowedOperations = []kms.Operation{kms.OpVerify}
		return p, nil
	}}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := e.svc.Sign(ctx, "k", []byte("m"), nil); !errors.Is(err, kms.ErrFailedPrecondition) {
		t.Fatalf("sign after the policy stopped allowing it: %v", err)
	}

	root, tok, info := e.workerToken(t)
	for i := 0; i < 3; i++ {
		if _, err := e.svc.Authenticate(ctx, tok); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.svc.RevokeToken(ctx, root, info.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := e.svc.Authenticate(ctx, tok); !errors.Is(err, kms.ErrUnauthenticated) {
		t.Fatalf("a revoked token authenticated from the cache: %v", err)
	}
}

// TestCacheDropsReadsThatRaceAChange: a token read from the store just
// before its revocation commits must not be put into the cache after the
// revocation cleared it. The read is held until the revocation is done;
// the request in flight may pass (it was served before the revocation),
// the next one must not.
func TestCacheDropsReadsThatRaceAChange(t *testing.T) {
	e := newEnv(t, 0)
	root, tok, info := e.workerToken(t)
	read, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	e.store.tokenRead = func(t *kms.Token) {
		if t.ID == info.ID {
			once.Do(func() {
				close(read)
				<-release
			})
		}
	}
	done := make(chan error)
	go func() {
		_, err := e.svc.Authenticate(ctx, tok)
		done <- err
	}()
	<-read // the record, not yet revoked, is on its way to the cache
	if _, err := e.svc.RevokeToken(ctx, root, info.ID); err != nil {
		t.Fatal(err)
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatalf("the request in flight: %v", err)
	}
	if _, err := e.svc.Authenticate(ctx, tok); !errors.Is(err, kms.ErrUnauthenticated) {
		t.Fatalf("a token revoked while its record was being read still authenticates: %v", err)
	}
}

// workerToken bootstraps the admin token and makes a worker token with it:
// the admin's principal, the worker token's text and its record.
func (e *env) workerToken(t *testing.T) (*kms.Principal, string, *kms.Token) {
	t.Helper()
	var admin string
	if _, err := e.svc.EnsureAdminToken(ctx, func(tok string) error { admin = tok; return nil }); err != nil {
		t.Fatal(err)
	}
	root, err := e.svc.Authenticate(ctx, admin)
	if err != nil {
		t.Fatal(err)
	}
	tok, info, err := e.svc.CreateToken(ctx, root, kms.TokenRequest{Role: kms.RoleWorker, Keys: []string{"*"}})
	if err != nil {
		t.Fatal(err)
	}
	return root, tok, info
}
