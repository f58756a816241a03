package hsm_test

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/kmsd-project/kmsd/hsm"
	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/kms/sealertest"
)

func TestMain(m *testing.M) { testhsm.Main(m) }

var sc = kms.SealContext{Key: "k1", Version: 3, Kind: "ml-dsa-65"}

func TestSealUnsealRoundTrip(t *testing.T) {
	s := testhsm.Open(t)
	ctx := context.Background()
	want := []byte("thirty-two bytes of seed material")
	blob, err := s.Seal(ctx, sc, kms.NewSecret(bytes.Clone(want)))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(blob, want) {
		t.Fatal("the blob contains the plaintext")
	}
	got, err := s.Unseal(ctx, sc, blob)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Reveal(), want) {
		t.Fatal("unsealed material differs")
	}
	blob2, _ := s.Seal(ctx, sc, kms.NewSecret(bytes.Clone(want)))
	if bytes.Equal(blob, blob2) {
		t.Fatal("two seals of the same material are identical: DEK or nonce reused")
	}
}

// TestBlobBoundToContext: a blob moved to another key, version or kind, or
// altered anywhere, does not open.
func TestBlobBoundToContext(t *testing.T) {
	s := testhsm.Open(t)
	ctx := context.Background()
	blob, err := s.Seal(ctx, sc, kms.NewSecret([]byte("material")))
	if err != nil {
		t.Fatal(err)
	}
	for _, other := range []kms.SealContext{
		{Key: "k2", Version: 3, Kind: "ml-dsa-65"},
		{Key: "k1", Version: 4, Kind: "ml-dsa-65"},
		{Key: "k1", Version: 3, Kind: "ml-dsa-87"},
		{Key: "k13", Version: 3, Kind: "ml-dsa-65"},
	} {
		if _, err := s.Unseal(ctx, other, blob); !errors.Is(err, hsm.ErrBlob) {
			t.Errorf("blob of %+v opened as %+v: err = %v", sc, other, err)
		}
	}
	for i := range blob {
		bad := bytes.Clone(blob)
		bad[i] ^= 0x01
		if _, err := s.Unseal(ctx, sc, bad); err == nil {
			t.Fatalf("a blob with byte %d flipped opened", i)
		}
	}
	for n := 0; n < len(blob); n += 7 {
		if _, err := s.Unseal(ctx, sc, blob[:n]); err == nil {
			t.Fatalf("a blob truncated to %d bytes opened", n)
		}
	}
}

func TestKEKIsSensitiveAndNeverExtractable(t *testing.T) {
	s := testhsm.Open(t)
	a, err := s.KEKAttributes(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !a.Sensitive || !a.AlwaysSensitive || a.Extractable || !a.NeverExtractable || !a.Token {
		t.Fatalf("KEK attributes %+v: want sensitive, always sensitive, not extractable, never extractable, token", a)
	}
	if a.KeyType != pkcs11.CKK_AES || a.ValueLen != 32 {
		t.Fatalf("KEK is type %d, %d bytes; want AES-256", a.KeyType, a.ValueLen)
	}
	if s.KEKID() != hex.EncodeToString(a.ID) || len(a.ID) != 16 {
		t.Fatalf("KEK id %q does not match CKA_ID %x", s.KEKID(), a.ID)
	}
}

// TestKEKFoundAgain: a second open finds the same KEK by label, so blobs
// sealed before a restart still open.
func TestKEKFoundAgain(t *testing.T) {
	ctx := context.Background()
	s1, err := hsm.Open(testhsm.Config(t))
	if err != nil {
		t.Fatal(err)
	}
	blob, err := s1.Seal(ctx, sc, kms.NewSecret([]byte("survives restart")))
	if err != nil {
		t.Fatal(err)
	}
	id := s1.KEKID()
	s1.Close()
	if _, err := s1.Seal(ctx, sc, kms.NewSecret([]byte("x"))); !errors.Is(err, hsm.ErrClosed) {
		t.Fatalf("Seal after Close: %v, want ErrClosed", err)
	}
	s2 := testhsm.Open(t)
	if s2.KEKID() != id {
		t.Fatalf("KEK id changed across opens: %s then %s", id, s2.KEKID())
	}
	got, err := s2.Unseal(ctx, sc, blob)
	if err != nil || string(got.Reveal()) != "survives restart" {
		t.Fatalf("Unseal after reopen: %q, %v", got.Reveal(), err)
	}
}

func TestOpenFailures(t *testing.T) {
	good := testhsm.Config(t)
	cases := []struct {
		name string
		edit func(c *hsm.Config)
		want error
		text string
	}{
		{"missing module", func(c *hsm.Config) { c.Module = "/nonexistent/libpkcs11.so" }, hsm.ErrModule, "/nonexistent/libpkcs11.so"},
		{"not a PKCS#11 library", func(c *hsm.Config) { c.Module = "/etc/hostname" }, hsm.ErrModule, "not a PKCS#11 library"},
		{"missing token", func(c *hsm.Config) { c.TokenLabel = "no-such-token" }, hsm.ErrTokenNotFound, "no-such-token"},
		{"wrong PIN", func(c *hsm.Config) { c.PIN = "wrong-pin" }, hsm.ErrPINIncorrect, "refused the PIN"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := good
			c.edit(&cfg)
			s, err := hsm.Open(cfg)
			if err == nil {
				s.Close()
				t.Fatal("Open succeeded")
			}
			if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.text) {
				t.Fatalf("err = %v; want %v mentioning %q", err, c.want, c.text)
			}
			if strings.Contains(err.Error(), good.PIN) || (cfg.PIN != good.PIN && strings.Contains(err.Error(), cfg.PIN)) {
				t.Fatal("the error names the PIN")
			}
		})
	}
	// After the failures a correct open still works: nothing was locked.
	testhsm.Open(t)
}

// faultModule wraps the real module and fails chosen calls.
type faultModule struct {
	hsm.Module
	mu            sync.Mutex
	failEncrypt   bool
	failDecrypt   bool
	failMechanism bool
	encrypts      int
	loginErr      error
	logins        int
}

func (f *faultModule) Login(sh pkcs11.SessionHandle, userType uint, pin string) error {
	f.mu.Lock()
	f.logins++
	err := f.loginErr
	f.mu.Unlock()
	if err != nil {
		return err
	}
	return f.Module.Login(sh, userType, pin)
}

var errInjected = pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)

func (f *faultModule) Encrypt(sh pkcs11.SessionHandle, m []byte) ([]byte, error) {
	f.mu.Lock()
	fail := f.failEncrypt
	f.encrypts++
	f.mu.Unlock()
	if fail {
		return nil, errInjected
	}
	return f.Module.Encrypt(sh, m)
}

// WrapKey fails with Encrypt: a token that fails to encrypt fails every
// profile.
func (f *faultModule) WrapKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, wk, key pkcs11.ObjectHandle) ([]byte, error) {
	f.mu.Lock()
	fail := f.failEncrypt
	f.mu.Unlock()
	if fail {
		return nil, errInjected
	}
	return f.Module.WrapKey(sh, m, wk, key)
}

func (f *faultModule) Decrypt(sh pkcs11.SessionHandle, c []byte) ([]byte, error) {
	f.mu.Lock()
	fail := f.failDecrypt
	f.mu.Unlock()
	if fail {
		return nil, errInjected
	}
	return f.Module.Decrypt(sh, c)
}

func (f *faultModule) GetMechanismList(slot uint) ([]*pkcs11.Mechanism, error) {
	ms, err := f.Module.GetMechanismList(slot)
	if f.failMechanism {
		var out []*pkcs11.Mechanism
		for _, m := range ms {
			if m.Mechanism != pkcs11.CKM_AES_GCM {
				out = append(out, m)
			}
		}
		return out, err
	}
	return ms, err
}

func openFaulty(t *testing.T, f *faultModule) (*hsm.Sealer, error) {
	return openFaultyWith(t, f, nil)
}

func openFaultyWith(t *testing.T, f *faultModule, edit func(*hsm.Config)) (*hsm.Sealer, error) {
	cfg := testhsm.Config(t)
	if edit != nil {
		edit(&cfg)
	}
	mod, err := hsm.LoadModule(cfg.Module)
	if err != nil {
		t.Fatal(err)
	}
	f.Module = mod
	cfg.Loaded = f
	return hsm.Open(cfg)
}

func TestMissingMechanismStopsOpen(t *testing.T) {
	s, err := openFaultyWith(t, &faultModule{failMechanism: true}, func(c *hsm.Config) { c.Profile = hsm.ProfileGCM })
	if err == nil {
		s.Close()
		t.Fatal("Open with the gcm profile succeeded without CKM_AES_GCM")
	}
	if !errors.Is(err, hsm.ErrMechanism) || !strings.Contains(err.Error(), "CKM_AES_GCM") {
		t.Fatalf("err = %v", err)
	}
}

func TestSelfTestFailureStopsOpen(t *testing.T) {
	s, err := openFaulty(t, &faultModule{failEncrypt: true})
	if err == nil {
		s.Close()
		t.Fatal("Open succeeded with a failing C_Encrypt")
	}
	if !errors.Is(err, hsm.ErrSelfTest) {
		t.Fatalf("err = %v, want ErrSelfTest", err)
	}
}

// TestHSMFaultAfterStart: a failing HSM makes Seal and Unseal fail with an
// error (never a blob that cannot open), and the sealer recovers when the
// HSM does.
func TestHSMFaultAfterStart(t *testing.T) {
	f := &faultModule{}
	s, err := openFaulty(t, f)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	blob, err := s.Seal(ctx, sc, kms.NewSecret([]byte("m")))
	if err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	f.failEncrypt, f.failDecrypt = true, true
	f.mu.Unlock()
	if b, err := s.Seal(ctx, sc, kms.NewSecret([]byte("m"))); err == nil || b != nil {
		t.Fatalf("Seal with a failing HSM = %x, %v", b, err)
	}
	if _, err := s.Unseal(ctx, sc, blob); err == nil {
		t.Fatal("Unseal with a failing HSM succeeded")
	}
	if err := s.Ping(ctx); err == nil {
		t.Fatal("Ping succeeded while the HSM fails")
	}
	f.mu.Lock()
	f.failEncrypt, f.failDecrypt = false, false
	f.mu.Unlock()
	// The sealer reconnects on its own, with back-off.
	deadline := time.Now().Add(10 * time.Second)
	for {
		got, err := s.Unseal(ctx, sc, blob)
		if err == nil && string(got.Reveal()) == "m" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Unseal after recovery: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if s.Reconnects() < 1 {
		t.Fatal("recovered without reconnecting")
	}
}

// TestTokenMovedAwayAndBack is the review's finding: with the token's
// files moved away and back, the KEK handle stayed invalid
// (CKR_OBJECT_HANDLE_INVALID) and every seal failed until a restart, while
// Ping kept answering. Now Ping fails while sealing would, and the sealer
// re-establishes the connection on its own once the token is back.
func TestTokenMovedAwayAndBack(t *testing.T) {
	s := testhsm.Open(t)
	ctx := context.Background()
	blob, err := s.Seal(ctx, sc, kms.NewSecret([]byte("m")))
	if err != nil {
		t.Fatal(err)
	}
	tokens := filepath.Join(filepath.Dir(testhsm.Setup().Conf), "tokens")
	if err := os.Rename(tokens, tokens+".away"); err != nil {
		t.Fatal(err)
	}
	restored := false
	defer func() {
		if !restored {
			os.Rename(tokens+".away", tokens)
		}
	}()
	if _, err := s.Seal(ctx, sc, kms.NewSecret([]byte("m"))); err == nil {
		t.Fatal("Seal succeeded with the token gone")
	}
	if err := s.Ping(ctx); err == nil {
		t.Fatal("Ping succeeded with the token gone")
	}
	time.Sleep(300 * time.Millisecond) // reconnection attempts fail meanwhile
	if err := s.Ping(ctx); err == nil {
		t.Fatal("Ping succeeded with the token still gone")
	}
	os.Rename(tokens+".away", tokens)
	restored = true
	deadline := time.Now().Add(10 * time.Second)
	for s.Ping(ctx) != nil {
		if time.Now().After(deadline) {
			t.Fatalf("not reconnected: %v", s.Ping(ctx))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got, err := s.Unseal(ctx, sc, blob); err != nil || string(got.Reveal()) != "m" {
		t.Fatalf("a blob sealed before does not open after: %v", err)
	}
	if _, err := s.Seal(ctx, sc, kms.NewSecret([]byte("m"))); err != nil {
		t.Fatal(err)
	}
}

// TestReconnectNeverRetriesARefusedPIN: when the token refuses the PIN on
// reconnection, the sealer stops trying (a retried wrong PIN locks the
// token) and stays unavailable.
func TestReconnectNeverRetriesARefusedPIN(t *testing.T) {
	f := &faultModule{}
	s, err := openFaulty(t, f)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	f.mu.Lock()
	f.failEncrypt = true
	f.loginErr = pkcs11.Error(pkcs11.CKR_PIN_INCORRECT)
	logins := f.logins
	f.mu.Unlock()
	ctx := context.Background()
	if _, err := s.Seal(ctx, sc, kms.NewSecret([]byte("m"))); err == nil {
		t.Fatal("Seal succeeded")
	}
	time.Sleep(3 * time.Second) // several back-off periods
	f.mu.Lock()
	f.failEncrypt = false
	tried := f.logins - logins
	f.mu.Unlock()
	if tried != 1 {
		t.Fatalf("%d logins after the PIN was refused, want exactly 1", tried)
	}
	if err := s.Ping(ctx); err == nil || !errors.Is(err, hsm.ErrDisconnected) {
		t.Fatalf("Ping after a refused PIN: %v", err)
	}
}

// TestConcurrentSeals runs many seals and unseals at once (with -race this
// also checks the pool hands each session to one goroutine at a time).
func TestConcurrentSeals(t *testing.T) {
	s := testhsm.Open(t)
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for g := 0; g < 32; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			c := kms.SealContext{Key: "c", Version: uint64(g + 1), Kind: "k"}
			for i := 0; i < 20; i++ {
				want := []byte{byte(g), byte(i)}
				b, err := s.Seal(ctx, c, kms.NewSecret(bytes.Clone(want)))
				if err != nil {
					errs <- err
					return
				}
				got, err := s.Unseal(ctx, c, b)
				if err != nil || !bytes.Equal(got.Reveal(), want) {
					errs <- errors.New("round trip failed")
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// TestSelfTestVectorMatchesSoftware recomputes the HSM self-test's known
// answer with Go's AES-GCM, so the constant cannot be wrong.
func TestSelfTestVectorMatchesSoftware(t *testing.T) {
	key, iv, dek, want := hsm.SelfTestVector()
	b, _ := aes.NewCipher(key)
	g, _ := cipher.NewGCM(b)
	if got := g.Seal(nil, iv, dek, []byte("kmsd hsm self-test")); !bytes.Equal(got, want) {
		t.Fatalf("self-test vector is wrong: %x", got)
	}
}

// TestConformance runs the sealer suite against the PKCS#11 sealer on
// SoftHSM, and against the fault-injecting wrapper the fault tests use.
func TestConformance(t *testing.T) {
	open := func(t *testing.T) kms.Sealer { return testhsm.Open(t) }
	t.Run("softhsm", func(t *testing.T) { sealertest.Run(t, open) })
	t.Run("faulty", func(t *testing.T) { sealertest.RunFaulty(t, open) })
}
