package hsm_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
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

// vendorModule is real SoftHSM made to behave, at the PKCS#11 boundary,
// as tokens that cannot run here do:
//   - hsmIV: AES-GCM encryption refuses an IV from the application (it
//     must be all zero) and draws its own, which it writes back into the
//     parameters (AWS CloudHSM; Thales Luna in FIPS mode);
//   - gcmCap: AES-GCM buffers are capped (CloudHSM: 16 KB);
//   - dataInvalid: a GCM tag mismatch is CKR_ENCRYPTED_DATA_INVALID, as
//     PKCS#11 says and opencryptoki and CloudHSM answer (SoftHSM:
//     CKR_GENERAL_ERROR);
//   - maxSessions: opening more sessions fails with CKR_SESSION_COUNT;
//   - loggedOut: the token forgot the login (an HSM restart): every
//     operation fails with CKR_USER_NOT_LOGGED_IN until C_Login.
type vendorModule struct {
	hsm.Module
	hsmIV       bool
	gcmCap      int
	dataInvalid bool
	maxSessions int

	mu        sync.Mutex
	sessions  int
	loggedOut bool
	refused   int      // sessions refused
	drawn     [][]byte // IVs the token drew
}

func (v *vendorModule) EncryptGCM(sh pkcs11.SessionHandle, key pkcs11.ObjectHandle, iv, aad, pt []byte) ([]byte, []byte, error) {
	if err := v.check(); err != nil {
		return nil, nil, err
	}
	if v.gcmCap > 0 && len(pt) > v.gcmCap {
		return nil, nil, pkcs11.Error(pkcs11.CKR_DATA_LEN_RANGE)
	}
	if v.hsmIV {
		if !bytes.Equal(iv, make([]byte, len(iv))) {
			return nil, nil, pkcs11.Error(pkcs11.CKR_MECHANISM_PARAM_INVALID) // "Expect IV to be all 0"
		}
		iv = make([]byte, 12)
		rand.Read(iv)
		v.mu.Lock()
		v.drawn = append(v.drawn, bytes.Clone(iv))
		v.mu.Unlock()
	}
	p := pkcs11.NewGCMParams(iv, aad, 128)
	defer p.Free()
	if err := v.Module.EncryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, p)}, key); err != nil {
		return nil, nil, err
	}
	ct, err := v.Module.Encrypt(sh, pt)
	return ct, iv, err
}

func (v *vendorModule) check() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.loggedOut {
		return pkcs11.Error(pkcs11.CKR_USER_NOT_LOGGED_IN)
	}
	return nil
}

func (v *vendorModule) Encrypt(sh pkcs11.SessionHandle, m []byte) ([]byte, error) {
	if err := v.check(); err != nil {
		return nil, err
	}
	return v.Module.Encrypt(sh, m)
}

func (v *vendorModule) Decrypt(sh pkcs11.SessionHandle, c []byte) ([]byte, error) {
	if err := v.check(); err != nil {
		return nil, err
	}
	pt, err := v.Module.Decrypt(sh, c)
	if v.dataInvalid && errors.Is(err, pkcs11.Error(pkcs11.CKR_GENERAL_ERROR)) {
		err = pkcs11.Error(pkcs11.CKR_ENCRYPTED_DATA_INVALID)
	}
	return pt, err
}

func (v *vendorModule) OpenSession(slot uint, flags uint) (pkcs11.SessionHandle, error) {
	v.mu.Lock()
	if v.maxSessions > 0 && v.sessions >= v.maxSessions {
		v.refused++
		v.mu.Unlock()
		return 0, pkcs11.Error(pkcs11.CKR_SESSION_COUNT)
	}
	v.sessions++
	v.mu.Unlock()
	sh, err := v.Module.OpenSession(slot, flags)
	if err != nil {
		v.mu.Lock()
		v.sessions--
		v.mu.Unlock()
	}
	return sh, err
}

func (v *vendorModule) CloseSession(sh pkcs11.SessionHandle) error {
	v.mu.Lock()
	v.sessions--
	v.mu.Unlock()
	return v.Module.CloseSession(sh)
}

func (v *vendorModule) Login(sh pkcs11.SessionHandle, userType uint, pin string) error {
	v.mu.Lock()
	v.loggedOut = false
	v.mu.Unlock()
	return v.Module.Login(sh, userType, pin)
}

func openVendor(t *testing.T, v *vendorModule, profile hsm.Profile) (*hsm.Sealer, error) {
	t.Helper()
	cfg := testhsm.Config(t)
	mod, err := hsm.LoadModule(cfg.Module)
	if err != nil {
		t.Fatal(err)
	}
	v.Module = mod
	cfg.Loaded, cfg.Profile = v, profile
	s, err := hsm.Open(cfg)
	if err == nil {
		t.Cleanup(func() { s.Close() })
	}
	return s, err
}

// TestHSMDrawnIV: on a token that draws the GCM IV itself and refuses one
// from the application (CloudHSM, Luna in FIPS mode), auto finds the
// gcm-hsm-iv profile by trying; every blob keeps the IV the token drew
// (no two alike), the sealer conformance suite passes, and the blobs open
// on a token that takes the application's IV (the same KEK).
func TestHSMDrawnIV(t *testing.T) {
	v := &vendorModule{hsmIV: true, gcmCap: 16 << 10, dataInvalid: true}
	s, err := openVendor(t, v, hsm.ProfileAuto)
	if err != nil {
		t.Fatal(err)
	}
	if s.Profile() != hsm.ProfileGCMHSMIV {
		t.Fatalf("profile %s, want gcm-hsm-iv", s.Profile())
	}
	sealertest.Run(t, func(t *testing.T) kms.Sealer { return s })
	ctx := context.Background()
	blob, err := s.Seal(ctx, sc, kms.NewSecret([]byte("sealed where the HSM draws the IV")))
	if err != nil {
		t.Fatal(err)
	}
	v.mu.Lock()
	last := v.drawn[len(v.drawn)-1]
	seen := map[string]bool{}
	for _, iv := range v.drawn {
		if seen[string(iv)] {
			t.Fatal("the token drew one IV twice")
		}
		seen[string(iv)] = true
	}
	v.mu.Unlock()
	if !bytes.HasPrefix(blob, []byte("KMS2\x02")) || !bytes.Contains(blob, last) {
		t.Fatalf("the blob does not keep the profile and the IV the token drew")
	}
	other := testhsm.Open(t)
	if other.Profile() != hsm.ProfileGCM {
		t.Fatalf("plain SoftHSM profile %s", other.Profile())
	}
	if got, err := other.Unseal(ctx, sc, blob); err != nil || string(got.Reveal()) != "sealed where the HSM draws the IV" {
		t.Fatalf("a gcm-hsm-iv blob on a token that takes the IV: %v", err)
	}
	// And the other way: a gcm blob opens on the drawing token (a
	// decryption takes the IV from the blob).
	b2, _ := other.Seal(ctx, sc, kms.NewSecret([]byte("gcm")))
	if got, err := s.Unseal(ctx, sc, b2); err != nil || string(got.Reveal()) != "gcm" {
		t.Fatalf("a gcm blob on the drawing token: %v", err)
	}
	// Asked for by name, the gcm profile is refused there, naming why.
	if _, err := openVendor(t, &vendorModule{hsmIV: true}, hsm.ProfileGCM); !errors.Is(err, hsm.ErrSelfTest) || !strings.Contains(err.Error(), "gcm") {
		t.Fatalf("gcm on a drawing token: %v", err)
	}
}

// TestGCMHSMIVRefusedWhereTheTokenTakesTheIV: forced onto a token that
// uses the IV it is given, gcm-hsm-iv would seal every blob under the zero
// IV; the start is refused.
func TestGCMHSMIVRefusedWhereTheTokenTakesTheIV(t *testing.T) {
	_, err := openVendor(t, &vendorModule{}, hsm.ProfileGCMHSMIV)
	if !errors.Is(err, hsm.ErrSelfTest) || !strings.Contains(err.Error(), "did not draw an IV") {
		t.Fatalf("gcm-hsm-iv on SoftHSM: %v", err)
	}
}

// TestCBCHMACWithoutGCM: on a token without AES-GCM (Debian 12's
// opencryptoki), auto makes the MAC key beside a new KEK and seals with
// cbc-hmac; the conformance suite passes; a blob opens on the same token
// with GCM back, and is refused with a clear error by a token that cannot
// do HMAC.
func TestCBCHMACWithoutGCM(t *testing.T) {
	cfg := testhsm.Config(t)
	cfg.KEKLabel = "cbc-hmac-kek"
	mod, err := hsm.LoadModule(cfg.Module)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Loaded = &faultModule{Module: mod, failMechanism: true}
	s, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.Profile() != hsm.ProfileCBCHMAC {
		t.Fatalf("profile %s, want cbc-hmac", s.Profile())
	}
	sealertest.Run(t, func(t *testing.T) kms.Sealer { return s })
	ctx := context.Background()
	blob, err := s.Seal(ctx, sc, kms.NewSecret([]byte("encrypt then MAC")))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(blob, []byte("KMS2\x03")) {
		t.Fatal("not a cbc-hmac blob")
	}
	s.Close()
	cfg2 := testhsm.Config(t)
	cfg2.KEKLabel, cfg2.CreateKEK = "cbc-hmac-kek", false
	withGCM, err := hsm.Open(cfg2)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := withGCM.Unseal(ctx, sc, blob); err != nil || string(got.Reveal()) != "encrypt then MAC" {
		t.Fatalf("cbc-hmac blob where GCM is back: %v", err)
	}
	withGCM.Close()
	mod3, _ := hsm.LoadModule(cfg2.Module)
	cfg2.Loaded = &noHMAC{Module: mod3}
	noMAC, err := hsm.Open(cfg2)
	if err != nil {
		t.Fatal(err)
	}
	defer noMAC.Close()
	if _, err := noMAC.Unseal(ctx, sc, blob); !errors.Is(err, hsm.ErrMechanism) || !strings.Contains(err.Error(), "CKM_SHA256_HMAC") {
		t.Fatalf("cbc-hmac blob on a token without HMAC: %v", err)
	}
}

// noHMAC is a token that does not list CKM_SHA256_HMAC.
type noHMAC struct{ hsm.Module }

func (n *noHMAC) GetMechanismList(slot uint) ([]*pkcs11.Mechanism, error) {
	ms, err := n.Module.GetMechanismList(slot)
	var out []*pkcs11.Mechanism
	for _, m := range ms {
		if m.Mechanism != pkcs11.CKM_SHA256_HMAC {
			out = append(out, m)
		}
	}
	return out, err
}

// TestFewSessions: a token that allows few sessions (CKR_SESSION_COUNT)
// serves eight goroutines at once with the sessions it has.
func TestFewSessions(t *testing.T) {
	v := &vendorModule{maxSessions: 2} // the login session and one more
	s, err := openVendor(t, v, hsm.ProfileAuto)
	if err != nil {
		t.Fatal(err)
	}
	sealertest.Run(t, func(t *testing.T) kms.Sealer { return s })
	// Eight at once, many times: the one pool session is busy often.
	ctx := context.Background()
	start := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Go(func() {
			<-start
			for range 50 {
				b, err := s.Seal(ctx, sc, kms.NewSecret([]byte("few sessions")))
				if err == nil {
					_, err = s.Unseal(ctx, sc, b)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		})
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if v.refused == 0 {
		t.Fatal("the token never refused a session: the test did not test")
	}
}

// TestLoggedOutUnderKmsd: the token forgets the login (an HSM restart);
// operations fail as unavailable, the sealer logs in again by itself and
// works on, blobs sealed before still open, without a restart of kmsd.
func TestLoggedOutUnderKmsd(t *testing.T) {
	v := &vendorModule{}
	s, err := openVendor(t, v, hsm.ProfileAuto)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	blob, err := s.Seal(ctx, sc, kms.NewSecret([]byte("before the HSM restart")))
	if err != nil {
		t.Fatal(err)
	}
	v.mu.Lock()
	v.loggedOut = true
	v.mu.Unlock()
	if _, err := s.Seal(ctx, sc, kms.NewSecret([]byte("x"))); err == nil {
		t.Fatal("sealed while logged out")
	}
	deadline := time.Now().Add(10 * time.Second)
	for s.Ping(ctx) != nil && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if got, err := s.Unseal(ctx, sc, blob); err != nil || string(got.Reveal()) != "before the HSM restart" {
		t.Fatalf("after logging in again: %v", err)
	}
	if s.Reconnects() == 0 {
		t.Fatal("no reconnection")
	}
}
