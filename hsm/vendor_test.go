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
	fixedIV     []byte        // with hsmIV: the token "draws" this IV every time
	failEncrypt int           // this many C_Encrypt calls fail with CKR_GENERAL_ERROR
	failAfter   time.Duration // ... after this long
	generalDec  bool          // every C_Decrypt fails with CKR_GENERAL_ERROR
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
		if v.fixedIV != nil {
			iv = bytes.Clone(v.fixedIV)
		}
		v.mu.Lock()
		v.drawn = append(v.drawn, bytes.Clone(iv))
		v.mu.Unlock()
	}
	p := pkcs11.NewGCMParams(iv, aad, 128)
	defer p.Free()
	if err := v.Module.EncryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, p)}, key); err != nil {
		return nil, nil, err
	}
	ct, err := v.Encrypt(sh, pt)
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
	v.mu.Lock()
	fail := v.failEncrypt > 0
	if fail {
		v.failEncrypt--
	}
	v.mu.Unlock()
	if fail {
		time.Sleep(v.failAfter)
		return nil, pkcs11.Error(pkcs11.CKR_GENERAL_ERROR)
	}
	return v.Module.Encrypt(sh, m)
}

func (v *vendorModule) Decrypt(sh pkcs11.SessionHandle, c []byte) ([]byte, error) {
	if err := v.check(); err != nil {
		return nil, err
	}
	v.mu.Lock()
	general := v.generalDec
	v.mu.Unlock()
	if general {
		return nil, pkcs11.Error(pkcs11.CKR_GENERAL_ERROR)
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

// TestCBCHMACWithoutGCM: on a token without AES-GCM or key wrap (Debian
// 12's opencryptoki), auto makes the MAC key beside a new KEK and seals with
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
	cfg.Loaded = &noGCM{Module: mod, noKWP: true}
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

// TestRepeatedHSMIVRefused is the outside review's finding: a token that
// writes back the same non-zero IV every time passed the start-up checks,
// and every blob was sealed under one GCM IV. kmsd remembers the IVs the
// token draws and refuses a repeat: such a token does not start.
func TestRepeatedHSMIVRefused(t *testing.T) {
	_, err := openVendor(t, &vendorModule{hsmIV: true, fixedIV: []byte("same IV 12by")}, hsm.ProfileAuto)
	if err == nil || !strings.Contains(err.Error(), "drawn before") {
		t.Fatalf("a token repeating its IV: %v", err)
	}
}

// TestSessionClosedWhileWaiting is the outside review's finding: with the
// token at its session limit, a caller waited for a session to come back;
// one closed as broken never did, and the sealer froze. Now waiters try
// again to open one, and every call ends.
func TestSessionClosedWhileWaiting(t *testing.T) {
	v := &vendorModule{maxSessions: 2} // the login session and one more
	s, err := openVendor(t, v, hsm.ProfileAuto)
	if err != nil {
		t.Fatal(err)
	}
	v.mu.Lock()
	v.failEncrypt, v.failAfter = 1, 200*time.Millisecond
	v.mu.Unlock()
	// A takes the one session and fails with it (closed as broken); B
	// asks meanwhile, is refused a second session, and waits.
	a := make(chan error, 1)
	go func() {
		_, err := s.Seal(context.Background(), sc, kms.NewSecret([]byte("a")))
		a <- err
	}()
	time.Sleep(50 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if _, err := s.Seal(ctx, sc, kms.NewSecret([]byte("b"))); err != nil {
		t.Fatalf("B, waiting while A's session was closed: %v", err)
	}
	if err := <-a; err == nil {
		t.Fatal("A's injected failure did not happen")
	}
	if v.refused == 0 {
		t.Fatal("B was never refused a session: the test did not test")
	}
}

// TestGeneralErrorOnAFailingToken: CKR_GENERAL_ERROR is SoftHSM's answer
// to a bad GCM tag, and other tokens' answer to a failure. A valid blob
// on a token failing that way is an error saying the token fails, not
// "the blob does not open".
func TestGeneralErrorOnAFailingToken(t *testing.T) {
	v := &vendorModule{}
	s, err := openVendor(t, v, hsm.ProfileAuto)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	blob, err := s.Seal(ctx, sc, kms.NewSecret([]byte("valid")))
	if err != nil {
		t.Fatal(err)
	}
	v.mu.Lock()
	v.generalDec = true
	v.mu.Unlock()
	_, err = s.Unseal(ctx, sc, blob)
	if err == nil || errors.Is(err, hsm.ErrBlob) || !strings.Contains(err.Error(), "round trip") {
		t.Fatalf("a valid blob on a failing token: %v", err)
	}
}

// TestBlobFieldLengths: a blob whose IV, wrapped key or MAC is not the
// size its profile makes is refused before the token sees it.
func TestBlobFieldLengths(t *testing.T) {
	s := testhsm.Open(t)
	ctx := context.Background()
	kek := []byte(s.KEKID())
	field := func(b []byte) []byte { return append([]byte{byte(len(b) >> 8), byte(len(b))}, b...) }
	for _, c := range []struct {
		name        string
		id          byte
		iv, ct, mac int
	}{
		{"empty IV", 2, 0, 48, 0},
		{"short wrapped key", 2, 12, 20, 0},
		{"cbc without MAC", 3, 16, 48, 0},
		{"cbc with a short IV", 3, 8, 48, 32},
	} {
		b := append([]byte("KMS2"), c.id)
		b = append(b, field(kek)...)
		b = append(b, field(make([]byte, c.iv))...)
		b = append(b, field(make([]byte, c.ct))...)
		b = append(b, field(make([]byte, c.mac))...)
		b = append(b, make([]byte, 12+40)...)
		if _, err := s.Unseal(ctx, sc, b); !errors.Is(err, hsm.ErrBlob) {
			t.Errorf("%s: %v", c.name, err)
		}
	}
}

// TestKEKFoundByLabelAndID: a second key with the KEK's label (another
// data dir's, made on the same token) made every start fail with "more
// than one key". With the id the store recorded, the sealer finds its
// own KEK; without it, the ambiguity is still refused.
func TestKEKFoundByLabelAndID(t *testing.T) {
	cfg := testhsm.Config(t)
	cfg.KEKLabel = "shared-label"
	first, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	id := first.KEKID()
	blob, err := first.Seal(context.Background(), sc, kms.NewSecret([]byte("first data dir")))
	if err != nil {
		t.Fatal(err)
	}
	first.Close()
	// Another KEK with the same label, as a second data dir's first start
	// on the same token would make.
	mod, _ := hsm.LoadModule(cfg.Module)
	mod.Initialize()
	slot, _ := hsm.FindToken(mod, cfg.TokenLabel)
	sh, _ := mod.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	mod.Login(sh, pkcs11.CKU_USER, cfg.PIN)
	other := make([]byte, 16)
	rand.Read(other)
	if _, err := mod.GenerateKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32), pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true), pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true), pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true), pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, "shared-label"), pkcs11.NewAttribute(pkcs11.CKA_ID, other),
	}); err != nil {
		t.Fatal(err)
	}
	mod.Finalize()
	if _, err := hsm.Open(cfg); !errors.Is(err, hsm.ErrKEK) || !strings.Contains(err.Error(), "more than one") {
		t.Fatalf("open by label alone: %v", err)
	}
	cfg.KEKID, cfg.CreateKEK = id, false
	s, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got, err := s.Unseal(context.Background(), sc, blob); err != nil || string(got.Reveal()) != "first data dir" {
		t.Fatalf("by label and id: %v", err)
	}
}
