"""A stand-in for the sounddevice package (PortAudio) in tests: the "microphone" plays a WAV file at real time.

FAKE_MIC_WAV: the 24 kHz mono file to play; FAKE_MIC_LOG: where the number of samples delivered is written when
the stream closes (so a test knows exactly what was "said" before Ctrl+C).
"""

import os
import threading
import time

import numpy as np
import soundfile


def query_devices(kind=None):
    return {"name": "fake microphone (WAV file)", "max_input_channels": 1}


class InputStream:
    def __init__(self, samplerate, channels, dtype, blocksize, callback):
        self.pcm, rate = soundfile.read(os.environ["FAKE_MIC_WAV"], dtype="float32")
        assert rate == samplerate and channels == 1
        self.blocksize, self.callback = blocksize, callback
        self.delivered = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._play, daemon=True)

    def _play(self):
        start = time.monotonic()
        while not self.stopped.is_set():
            block = self.pcm[self.delivered:self.delivered + self.blocksize]
            if len(block) < self.blocksize:  # the file is over: silence, as a quiet room
                block = np.pad(block, (0, self.blocksize - len(block)))
            self.callback(block[:, None], self.blocksize, None, None)
            self.delivered += self.blocksize
            time.sleep(max(0.0, start + self.delivered / 24000 - time.monotonic()))

    def __enter__(self):
        open(os.environ["FAKE_MIC_LOG"] + ".started", "w").close()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join()
        with open(os.environ["FAKE_MIC_LOG"], "w") as log:
            log.write(str(self.delivered))
